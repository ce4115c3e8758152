#!/usr/bin/env bash
# The three offline tasks on any machine, no downloads: byte-level GPT on the stdlib,
# code summarization (encoder-decoder, BLEU vs baselines), stdlib BERT (MLM accuracy vs unigram).
# Usage: experiments/offline.sh [RUNS_DIR]   (default runs/); writes RUNS_DIR/*/results.json
set -euo pipefail
runs=${1:-runs}
here=$(dirname "${BASH_SOURCE[0]}")
for name in default codesum_transformer stdlib_bert; do
  "$here/reproduce.sh" "$name" "$runs/$name"
done
