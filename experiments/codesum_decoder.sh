#!/usr/bin/env bash
# Code summarization with the default decoder (configs/codesum_decoder*.py): pretrain it on the stdlib unless
# RUNS_DIR/default exists, fine-tune it as prompt -> completion in full and with LoRA, then report each one's
# validation loss and BLEU (beam 4) beside the baselines (RUNS_DIR/codesum_decoder*/results.json); compare with
# the encoder-decoder's (experiments/offline.sh, configs/codesum_transformer.py).
# Usage: experiments/codesum_decoder.sh [RUNS_DIR]   (default runs/)
set -euo pipefail
runs=${1:-runs}
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=experiments/_env.sh
source "$here/_env.sh"
if [[ ! -d $runs/default ]]; then
  "$JAXLM" train --config "$here/../configs/default.py" --workdir "$runs/default"
fi
"$here/reproduce.sh" codesum_decoder "$runs/codesum_decoder" -- --config.train.init_from="$runs/default"
"$here/reproduce.sh" codesum_decoder_lora "$runs/codesum_decoder_lora" -- --config.lora.base_workdir="$runs/default"
