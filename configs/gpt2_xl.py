"""GPT-2 xl (1558M parameters; Radford et al., 2019): 48 layers, d_model 1600, 25 heads, context 1024.

Command:   experiments/gpt.sh gpt2_xl gs://BUCKET/gpt2_xl   (train, then evaluate)
           or: jaxlm train --config configs/gpt2_xl.py --workdir gs://BUCKET/gpt2_xl
Hardware:  v4-256 (bfloat16 compute, float32 master weights).
Time:      about 2 weeks (estimate, not measured) for 300B tokens at 0.5M tokens per step
           (GPT-3's recipe; GPT-2's own is unpublished).
Expected:  the paper's zero-shot WikiText-103 perplexity is 17.48; jaxlm reports C4 validation
           loss/perplexity with its own SentencePiece vocabulary, which is not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-2's WebText is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.558e09


def get_config():
  c = presets.gpt(48, 1600, 25)
  # The plan for the slice the docstring names, so the step fits there as written (v4-256 (128 chips): 4 rows per
  # chip): d_model 1600 splits at most 64 ways, so data 2 x fsdp 64; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, data=2, remat_policy="full", micro_batches=1)
  return c
