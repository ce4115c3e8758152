#!/usr/bin/env bash
# Usage: tpu/launch.sh --name NAME --zone ZONE --project PROJECT
#            --config CONFIG --workdir WORKDIR [--eval] [--dry-run]
#            [-- JAXLM_TRAIN_ARGS...]
#
# Starts `jaxlm train` in the background on every worker of the TPU VM (one
# process per host) and returns; follow it with logs.sh. CONFIG is a path
# inside the repo (e.g. configs/x.py). WORKDIR must be shared by all hosts,
# i.e. a gs:// bucket path. Arguments after `--` go to `jaxlm train`, e.g.
# -- --config.train.num_steps=100. With --eval, `jaxlm eval` runs after
# training succeeds. Output goes to ~/jaxlm-train.log on each worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name= zone= project= config= workdir= eval --" "$@"
require name zone project config workdir

# num_processes=-1 makes jaxlm call jax.distributed.initialize() with no
# arguments: on TPU VMs it discovers the coordinator address, process count
# and process id from the TPU metadata.
job="jaxlm train --config $(shell_quote "${OPT[config]}") --workdir $(shell_quote "${OPT[workdir]}") --config.distributed.num_processes=-1"
if ((${#EXTRA_ARGS[@]})); then
  job+=" $(shell_quote "${EXTRA_ARGS[@]}")"
fi
if [[ -n ${OPT[eval]:-} ]]; then
  job+=" && jaxlm eval --workdir $(shell_quote "${OPT[workdir]}")"
fi

# All hosts must start together, hence --worker=all. nohup and the
# redirections detach the job so it survives the ssh session ending.
tpu_ssh all "cd ~/jaxlm && . ~/jaxlm-venv/bin/activate && nohup bash -c $(double_quote "$job") > ~/jaxlm-train.log 2>&1 < /dev/null &"
