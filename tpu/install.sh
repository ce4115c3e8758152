#!/usr/bin/env bash
# Usage: tpu/install.sh --name NAME --zone ZONE --project PROJECT
#            [--repo URL_OR_DIR] [--ref REF] [--dry-run]
#
# Installs jaxlm on every worker of the TPU VM: ~/jaxlm holds the code and
# ~/jaxlm-venv a virtualenv with `uv pip install -e '.[tpu]'`. --repo is a git
# URL to clone (optionally at --ref: branch, tag or commit) or a local git
# checkout, of which only the files git tracks are shipped (as they are on
# disk, uncommitted edits included; not .venv/, runs/, data/ or other
# untracked or ignored files); it defaults to this checkout. Rerunning
# replaces ~/jaxlm and updates the venv.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPT[repo]=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
parse_args "name= zone= project= repo= ref=" "$@"
require name zone project repo

# TPU VM images ship Python 3.10 (Ubuntu 22.04), older than jaxlm's
# requires-python, so uv fetches a standalone Python 3.11 for the venv.
# Remote commands stay on one line so --dry-run prints one line per command.
setup='python3 -m pip install -q --user --upgrade uv && cd ~/jaxlm'
setup+=' && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/jaxlm-venv'
setup+=' && ~/.local/bin/uv pip install -q --python ~/jaxlm-venv -e ".[tpu]"'

if [[ -d ${OPT[repo]} ]]; then
  [[ -z ${OPT[ref]:-} ]] || usage_error "--ref needs --repo to be a git URL, not a directory"
  git -C "${OPT[repo]}" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    usage_error "--repo ${OPT[repo]} is not a git checkout: install.sh ships the files git tracks there"
  # The tracked files as they are on disk; tar skips (with a warning) a tracked file deleted but not committed.
  archive="${TMPDIR:-/tmp}/jaxlm-${OPT[name]}.tar.gz"
  tracked=(git -C "${OPT[repo]}" ls-files -z)
  pack=(tar -C "${OPT[repo]}" --null --files-from=- --ignore-failed-read -czf "$archive")
  if ((DRY_RUN)); then
    echo "$(shell_quote "${tracked[@]}") | $(shell_quote "${pack[@]}")"
  else
    trap 'rm -f "$archive"' EXIT
    "${tracked[@]}" | "${pack[@]}"
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "${OPT[name]}:jaxlm.tar.gz" \
    --zone "${OPT[zone]}" --project "${OPT[project]}" --worker=all
  tpu_ssh all "rm -rf ~/jaxlm && mkdir ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm && rm ~/jaxlm.tar.gz && $setup"
else
  fetch="rm -rf ~/jaxlm && git clone -q $(shell_quote "${OPT[repo]}") ~/jaxlm"
  if [[ -n ${OPT[ref]:-} ]]; then
    fetch+=" && git -C ~/jaxlm checkout -q $(shell_quote "${OPT[ref]}")"
  fi
  tpu_ssh all "$fetch && $setup"
fi
