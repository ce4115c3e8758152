#!/usr/bin/env bash
# Offline classification (configs/stdlib_classify.py): which of ten stdlib packages a function comes from.
# Trains the encoder ([CLS]) and the decoder (last token) heads, then reports accuracy and macro P/R/F1 beside
# the majority-class and naive Bayes baselines, with a per-class table (WORKDIR/*/eval.log).
# Usage: experiments/classify.sh [RUNS_DIR]   (default runs/)
set -euo pipefail
runs=${1:-runs}
here=$(dirname "${BASH_SOURCE[0]}")
"$here/reproduce.sh" stdlib_classify "$runs/stdlib_classify"
"$here/reproduce.sh" stdlib_classify "$runs/stdlib_classify_decoder" -- \
  --config.model.family=decoder_classifier --config.model.norm_position=pre --config.model.embed_norm=False
