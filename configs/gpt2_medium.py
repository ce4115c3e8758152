"""GPT-2 medium (355M parameters; Radford et al., 2019): 24 layers, d_model 1024, 16 heads, context 1024.

Command:   experiments/gpt.sh gpt2_medium gs://BUCKET/gpt2_medium   (train, then evaluate)
           or: jaxlm train --config configs/gpt2_medium.py --workdir gs://BUCKET/gpt2_medium
Hardware:  v4-64 or 16x A100 (bfloat16 compute, float32 master weights).
Time:      about 1 week (estimate, not measured) for 300B tokens at 0.5M tokens per step
           (GPT-3's recipe; GPT-2's own is unpublished).
Expected:  the paper's zero-shot WikiText-103 perplexity is 26.37; jaxlm reports C4 validation
           loss/perplexity with its own SentencePiece vocabulary, which is not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-2's WebText is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 3.55e08


def get_config():
  c = presets.gpt(24, 1024, 16)
  # The plan for the slice the docstring names, so the step fits there as written (v4-64 (32 chips): 4 rows per chip
  # per micro-batch): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=4)
  return c
