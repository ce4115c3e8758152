#!/usr/bin/env bash
# Classification from a pretrained encoder (configs/stdlib_classify_bert.py): pretrains the stdlib BERT
# unless RUNS_DIR/stdlib_bert exists, then trains the stdlib-package classifier from its weights and, for
# comparison, the same model from scratch; each reports accuracy and macro P/R/F1 beside the baselines.
# Usage: experiments/classify_pretrained.sh [RUNS_DIR]   (default runs/)
set -euo pipefail
runs=${1:-runs}
here=$(dirname "${BASH_SOURCE[0]}")
[[ -d $runs/stdlib_bert/checkpoints ]] || "$here/reproduce.sh" stdlib_bert "$runs/stdlib_bert"
"$here/reproduce.sh" stdlib_classify_bert "$runs/stdlib_classify_bert" -- \
  "--config.train.init_from=$runs/stdlib_bert"
"$here/reproduce.sh" stdlib_classify_bert "$runs/stdlib_classify_scratch" -- --config.train.init_from=
