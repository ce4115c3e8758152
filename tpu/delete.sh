#!/usr/bin/env bash
# Usage: tpu/delete.sh --name NAME --zone ZONE --project PROJECT [--dry-run]
#
# Deletes the queued resource made by create.sh together with its TPU VM
# (billing stops only once the VM is gone). Does not ask for confirmation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name= zone= project=" "$@"
require name zone project

# --force also deletes the VM, which otherwise blocks deleting the request.
queued_resource delete --force --quiet
