"""Transformer base (65M parameters; Vaswani et al., 2017, Table 3) on WMT'14 English->German.

Command:   experiments/transformer.sh transformer_base runs/transformer_base   (train, then BLEU)
           or: jaxlm train --config configs/transformer_base.py --workdir runs/transformer_base
               jaxlm eval --workdir runs/transformer_base
Hardware:  8 GPUs (the paper: 8x P100) or a TPU v4-8.
Time:      100k steps; 12 hours on 8 P100s in the paper.
Params:    63.1M here: the paper's 65M is rounded and does not say what it counts.
Expected:  BLEU 27.3 on newstest2014 (the paper's; it averages the last checkpoints and scores
           tokenized BLEU, so sacrebleu's detokenized score typically comes out lower).
Data:      wmt14_translate/de-en via TFDS (docs/data.md); the SentencePiece vocabulary is trained on
           its training text on first use.
"""

from jaxlm.config import presets

PAPER_PARAMS = 6.5e07


def get_config():
  c = presets.transformer(big=False)
  # The plan for the slice the docstring names, so the step fits there as written (v4-8 (4 chips): 24 rows of 256 +
  # 256 tokens per chip): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="none", micro_batches=1)
  return c
