#!/usr/bin/env bash
# GPT-2 / GPT-3 / LLaMA configs: train on C4, then validation loss and perplexity.
# Usage: experiments/gpt.sh CONFIG_NAME WORKDIR [-- --config.KEY=VALUE ...]
# Needs C4 prepared for TFDS as in docs/data.md; pass --config.data.tfds_data_dir=DIR after --. At C4 scale on
# a slice, tokenize it once with `jaxlm prepare --out gs://BUCKET/data/c4` and pass
# --config.data.source=prepared --config.data.prepared_dir=gs://BUCKET/data/c4 instead: each process then reads
# only its own rows from the bucket (tpu/README.md walks through it).
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/reproduce.sh" "$@"
