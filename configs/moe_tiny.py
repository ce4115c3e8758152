"""Tiny mixture of experts on the default corpus: 8 SwiGLU experts, top-2, against its dense peer.

Command:   nice -n 10 python experiments/moe.py --out runs/moe   (this MoE, its dense peer, capacity dispatch)
           jaxlm train --config configs/moe_tiny.py --workdir runs/moe_tiny   (the MoE alone)
Hardware:  2-core x86-64 CPU, float32.
Time:      docs/moe.md ("A tiny MoE against its dense peer") gives the measured wall time of each run.
Expected:  docs/moe.md's table: validation loss of this MoE and of its dense peer
           (`--config.model.moe_experts=0`: one SwiGLU MLP of mlp_dim 384) at the same steps, load per expert
           and the fraction of choices capacity dispatch drops. Both have the same active weights per token:
           two experts of 3 x 128 x 192 = one MLP of 3 x 128 x 384 (147,456 per layer), so the same training
           FLOPs per step up to the router (128 x 8 per layer, 0.7% of the MLP). configs/default.py's corpus
           (the standard library's source, bytes) and optimizer on a smaller model (2 layers, d_model 128,
           rows of 128 bytes, batch 8) so that a run takes minutes on a shared 2-core machine.
"""

from jaxlm.config import load_config_file

DEFAULT = __file__.replace("moe_tiny.py", "default.py")


def get_config():
  config = load_config_file(DEFAULT)
  m = config.model
  m.num_layers, m.d_model, m.max_len = 2, 128, 128
  m.mlp, m.mlp_dim = "swiglu", 384  # the dense peer's MLP (moe_experts=0); the experts' width is moe_hidden
  m.moe_experts, m.moe_top_k, m.moe_hidden = 8, 2, 192
  config.data.seq_len = 128
  config.train.global_batch_size = 8
  config.train.num_steps = 120
  config.train.eval_every = 20
  config.train.eval_batches = 4
  config.train.checkpoint_every = 120
  config.optim.warmup_steps = 20
  return config
