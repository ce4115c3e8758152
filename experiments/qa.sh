#!/usr/bin/env bash
# Extractive QA (configs/squad_bert_tiny.py): train, then exact match and F1 beside the first-words baseline.
# Needs TFDS `squad` prepared (docs/data.md), or SQuAD JSON passed as overrides after `--`.
# Usage: experiments/qa.sh [WORKDIR] [-- --config.KEY=VALUE ...]   (default runs/squad_bert_tiny)
set -euo pipefail
workdir=${1:-runs/squad_bert_tiny}
shift $(($# > 0 ? 1 : 0))
exec "$(dirname "${BASH_SOURCE[0]}")/reproduce.sh" squad_bert_tiny "$workdir" "$@"
