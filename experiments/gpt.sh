#!/usr/bin/env bash
# GPT-2 / GPT-3 / LLaMA configs: train on C4, then validation loss and perplexity.
# Usage: experiments/gpt.sh CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]
# Needs the TFDS data prepared as in docs/data.md; pass --config.data.tfds_data_dir=DIR after --.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/reproduce.sh" "$@"
