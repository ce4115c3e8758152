"""Transformer big (213M parameters; Vaswani et al., 2017, Table 3) on WMT'14 English->German.

Command:   experiments/transformer.sh transformer_big runs/transformer_big   (train, then BLEU)
           or: jaxlm train --config configs/transformer_big.py --workdir runs/transformer_big
               jaxlm eval --workdir runs/transformer_big
Hardware:  8 GPUs (the paper: 8x P100) or a TPU v4-8.
Time:      300k steps; 3.5 days on 8 P100s in the paper.
Expected:  BLEU 28.4 on newstest2014 (the paper's; it averages the last checkpoints and scores
           tokenized BLEU, so sacrebleu's detokenized score typically comes out lower).
Data:      wmt14_translate/de-en via TFDS (docs/data.md); the SentencePiece vocabulary is trained on
           its training text on first use.
"""

from jaxlm.config import presets

PAPER_PARAMS = 2.13e08


def get_config():
  c = presets.transformer(big=True)
  # The plan for the slice the docstring names, so the step fits there as written (v4-8 (4 chips): 24 rows of 256 +
  # 256 tokens per chip): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=1)
  return c
