#!/usr/bin/env bash
# Usage: tpu/install.sh --name NAME --zone ZONE --project PROJECT
#            [--repo URL_OR_DIR] [--ref REF] [--dry-run]
#
# Installs jaxlm on every worker of the TPU VM: ~/jaxlm holds the code and
# ~/jaxlm-venv a virtualenv with `uv pip install -e '.[tpu]'`. --repo is a git
# URL to clone (optionally at --ref: branch, tag or commit) or a local
# directory to copy as-is; it defaults to this checkout, uncommitted changes
# included. Rerunning replaces ~/jaxlm and updates the venv.
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
  # scp into an existing ~/jaxlm would nest the copy inside it, so clear it.
  tpu_ssh all 'rm -rf ~/jaxlm'
  run gcloud compute tpus tpu-vm scp --recurse "${OPT[repo]}" "${OPT[name]}:jaxlm" \
    --zone "${OPT[zone]}" --project "${OPT[project]}" --worker=all
  tpu_ssh all "$setup"
else
  fetch="rm -rf ~/jaxlm && git clone -q $(shell_quote "${OPT[repo]}") ~/jaxlm"
  if [[ -n ${OPT[ref]:-} ]]; then
    fetch+=" && git -C ~/jaxlm checkout -q $(shell_quote "${OPT[ref]}")"
  fi
  tpu_ssh all "$fetch && $setup"
fi
