#!/usr/bin/env bash
# Usage: tpu/logs.sh --name NAME --zone ZONE --project PROJECT [--worker N]
#            [--dry-run]
#
# Streams ~/jaxlm-train.log, written by launch.sh, from one worker (default
# 0). Every worker has its own log. Ctrl-C stops streaming, not training.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OPT[worker]=0
parse_args "name= zone= project= worker=" "$@"
require name zone project worker

tpu_ssh "${OPT[worker]}" 'tail -f ~/jaxlm-train.log'
