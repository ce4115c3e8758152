"""Mixtral 8x7B (Jiang et al., 2024): Mistral-7B's body with a sparse MLP, 8 SwiGLU experts of 14336, top-2.

Command:   experiments/gpt.sh mixtral_8x7b gs://BUCKET/mixtral_8x7b   (train on C4, then evaluate)
Hardware:  TPU v5p-64 (32 chips), as planned below; `jaxlm compile --config configs/mixtral_8x7b.py
           --topology v5p-64` sizes it without a TPU (docs/tpu.md).
Time:      not published. 12.9B active parameters per token: 6 x 12.9e9 x 1T tokens = 7.7e22 FLOPs for a
           LLaMA-sized 1T-token run, about 120 days on v5p-64 at 50% MFU (a v5p-64 sizes it; rent more).
Expected:  the paper's MMLU 70.6 and HellaSwag 84.4 (Table 2) come from undisclosed data; jaxlm reports C4
           validation loss/perplexity. Architecture as the released model: 32 layers, d_model 4096, 32 heads
           with 8 key/value heads, RoPE base 1e6, 32768 positions, 32000-token vocabulary, 46.7B parameters.
           The training recipe (data, batch, learning rate) is not in the paper: LLaMA's (presets.llama) at
           4096-token rows, router loss weights as Switch/ST-MoE (aux 0.01, z 0.001).
"""

from jaxlm.config import presets

PAPER_PARAMS = 46.7e9


def get_config():
  c = presets.llama(num_layers=32, d_model=4096, num_heads=32, mlp_dim=14336)
  m = c.model
  m.num_kv_heads, m.rope_theta, m.max_len = 8, 1e6, 32768
  m.moe_experts, m.moe_top_k, m.moe_hidden = 8, 2, 14336
  c.data.seq_len = 4096
  c.train.global_batch_size = 1024  # 4M tokens, LLaMA's batch
  c.train.num_steps = int(1e12 / (1024 * 4096))
  # The plan for v5p-64 (32 chips), checked by benchmarks/fit_paper_configs.py: expert parallelism 8 (one expert
  # per chip of a group, tokens all-gathered within it) x fsdp over the rest (4), remat full, 2 rows per chip per
  # micro-batch (with 4 the step needs 109 GiB of the 95).
  presets.slice_plan(c, remat_policy="full", micro_batches=16)
  c.mesh.expert = 8
  return c
