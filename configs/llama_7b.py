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
  return presets.llama()
