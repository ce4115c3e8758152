#!/usr/bin/env bash
# BERT base/large: MLM pretraining, then MLM loss/accuracy beside the unigram baseline.
# Usage: experiments/bert.sh CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]
# Needs the TFDS data prepared as in docs/data.md; pass --config.data.tfds_data_dir=DIR after --.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/reproduce.sh" "$@"
