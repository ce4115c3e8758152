"""LLaMA-7B style (Touvron et al., 2023): 32 layers, d_model 4096, 32 heads, SwiGLU 11008, RoPE, RMSNorm.

Command:   experiments/gpt.sh llama_7b gs://BUCKET/llama_7b   (train on C4, then evaluate)
Hardware:  TPU v4-512 / v5p-256 class, with --config.mesh.fsdp=-1 --config.mesh.data=1.
Time:      1T tokens; the paper's 7B took about 82k A100-hours.
Expected:  the paper's zero-shot HellaSwag 76.1 (Table 3); jaxlm reports C4 validation loss/perplexity.
Data:      C4 via TFDS (docs/data.md); a 32000-id SentencePiece vocabulary trained on first use.
"""

from jaxlm.config import presets

PAPER_PARAMS = 6.74e9


def get_config():
  c = presets.llama()
  # The plan for the slice the docstring names, so the step fits there as written (v4-512 (256 chips) 1 row, v5p-256
  # (128 chips) 2 rows per chip per micro-batch): fsdp over the devices the other axes leave; checked by
  # benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=8)
  return c
