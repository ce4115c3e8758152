#!/usr/bin/env bash
# Usage: tpu/create.sh --name NAME --accelerator-type TYPE --zone ZONE
#            --project PROJECT [--runtime-version V] [--spot] [--dry-run]
#
# Creates a TPU VM (e.g. TYPE=v5e-16, the same as v5litepod-16, or v5e:4x4)
# through a queued resource and waits until it is ACTIVE. TYPE is passed to
# gcloud in Cloud's spelling. --runtime-version defaults to Google's
# recommended JAX image for the TPU generation. --dry-run prints the gcloud
# commands instead of running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name= accelerator-type= zone= project= runtime-version= spot" "$@"
require name accelerator-type zone project

# Slice names and default runtimes come from jaxlm's one table (tpu_slice in common.sh). A generation
# the table lacks goes to gcloud as written when --runtime-version names its image.
status=0
answer=$(tpu_slice "${OPT[accelerator-type]}" 2>&1) || status=$?
if ((status == 0)); then
  read -r accelerator runtime <<<"$answer"
  OPT[accelerator-type]=$accelerator
  OPT[runtime-version]=${OPT[runtime-version]:-$runtime}
elif ((status == 3)) && [[ -z ${OPT[runtime-version]:-} ]]; then
  usage_error "--accelerator-type $answer; or pass --runtime-version for a generation not listed"
elif ((status != 3)); then
  usage_error "--accelerator-type $answer"
fi

spot=()
if [[ -n ${OPT[spot]:-} ]]; then
  spot=(--spot)
fi

# A queued resource, unlike `tpu-vm create`, waits for capacity instead of
# failing at once when the zone has no free TPUs.
queued_resource create \
  --node-id "${OPT[name]}" \
  --accelerator-type "${OPT[accelerator-type]}" \
  --runtime-version "${OPT[runtime-version]}" \
  "${spot[@]}"

describe=(queued_resource describe --format='value(state.state)')
if ((DRY_RUN)); then
  "${describe[@]}"
  exit 0
fi

# Capacity can take minutes to hours; poll quietly, reporting state changes.
last=""
while true; do
  state=$("${describe[@]}")
  case $state in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED)
      echo "$PROG: queued resource ${OPT[name]} is $state" >&2
      exit 1
      ;;
  esac
  if [[ $state != "$last" ]]; then
    echo "$PROG: ${OPT[name]} is $state; waiting for ACTIVE..." >&2
    last=$state
  fi
  sleep 30
done
echo "$PROG: ${OPT[name]} is ACTIVE" >&2
