#!/usr/bin/env bash
# Runs one reproduction end to end: train, reload the checkpoints for evaluation, write results.
#
# Usage: experiments/reproduce.sh CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]
#   CONFIG_NAME is a file in configs/ without .py (e.g. transformer_base, bert_base, gpt3_small).
#   Evaluation is what the family reports: BLEU with beam search (encoder_decoder),
#   MLM loss/accuracy vs the unigram baseline (encoder), loss/perplexity/bits per byte (decoder).
#   WORKDIR/results.json gets the evaluation of the last checkpoint.
# Multi-host TPU: run it through tpu/launch.sh instead (--eval does the same two steps).
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]" >&2
  exit 2
fi
name=$1 workdir=$2
shift 2
[[ ${1:-} == "--" ]] && shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=experiments/_env.sh
source "$repo/experiments/_env.sh"
config="$repo/configs/$name.py"
if [[ ! -f $config ]]; then
  echo "$0: no config $config; see configs/" >&2
  exit 2
fi
"$JAXLM" train --config "$config" --workdir "$workdir" "$@"
"$JAXLM" eval --workdir "$workdir" | tee "$workdir/eval.log"
latest=$(find "$workdir" -maxdepth 1 -name 'eval_step_*.json' | sort -t_ -k3 -n | tail -n 1)
cp "$latest" "$workdir/results.json"
echo "results: $workdir/results.json"
