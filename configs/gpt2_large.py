"""GPT-2 large (774M parameters; Radford et al., 2019): 36 layers, d_model 1280, 20 heads, context 1024.

Command:   experiments/gpt.sh gpt2_large gs://BUCKET/gpt2_large   (train, then evaluate)
           or: jaxlm train --config configs/gpt2_large.py --workdir gs://BUCKET/gpt2_large
Hardware:  v4-128 (bfloat16 compute, float32 master weights).
Time:      about 1-2 weeks (estimate, not measured) for 300B tokens at 0.5M tokens per step
           (GPT-3's recipe; GPT-2's own is unpublished).
Expected:  the paper's zero-shot WikiText-103 perplexity is 22.05; jaxlm reports C4 validation
           loss/perplexity with its own SentencePiece vocabulary, which is not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-2's WebText is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 7.74e08


def get_config():
  c = presets.gpt(36, 1280, 20)
  # The plan for the slice the docstring names, so the step fits there as written (v4-128 (64 chips): 4 rows per chip
  # per micro-batch): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=2)
  return c
