#!/usr/bin/env bash
# Transformer base/big on WMT'14 en-de: train, then BLEU (beam 4, alpha 0.6) on newstest2014.
# Usage: experiments/transformer.sh CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]
# Needs the TFDS data prepared as in docs/data.md; pass --config.data.tfds_data_dir=DIR after --.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/reproduce.sh" "$@"
