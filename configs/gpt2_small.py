"""GPT-2 small (124M parameters; Radford et al., 2019): 12 layers, d_model 768, 12 heads, context 1024.

Command:   experiments/gpt.sh gpt2_small gs://BUCKET/gpt2_small   (train, then evaluate)
           or: jaxlm train --config configs/gpt2_small.py --workdir gs://BUCKET/gpt2_small
Hardware:  v5e-8, v4-32 or 8x A100 (bfloat16 compute, float32 master weights).
Time:      about 4 days (estimate, not measured) for 300B tokens at 0.5M tokens per step
           (GPT-3's recipe; GPT-2's own is unpublished).
Expected:  the paper's zero-shot WikiText-103 perplexity is 37.5; jaxlm reports C4 validation
           loss/perplexity with its own SentencePiece vocabulary, which is not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-2's WebText is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.24e08


def get_config():
  c = presets.gpt(12, 768, 12)
  # The plan for v5e-8, the smallest slice the docstring names, so the step fits there as written: `jaxlm compile
  # --plan` picked it (peak 9.54 GiB of 16 per chip by XLA, estimated step 284 ms against 379 ms for remat full);
  # v4-32 holds half the rows per chip. fsdp over the devices the other axes leave; checked by
  # benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="dots", micro_batches=8)
  return c
