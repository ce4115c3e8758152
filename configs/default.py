"""Default job: a byte-level GPT on the Python standard library's own source.

Command:   jaxlm train --config configs/default.py --workdir runs/default
           jaxlm eval --workdir runs/default
Hardware:  2-core x86-64 CPU (CI-sized machine), float32.
Time:      5 min 38 s for README command 1 from a fresh clone (install 1 min, 600 steps at about
           0.43 s/step = 4 min 20 s with the CPU kernels, training's validation of 8 batches 15 s),
           measured 2026-11-29 with jax 0.10.2 (8 min 52 s before the kernels); 7 min 59 s on a 2-core AMD
           EPYC on 2026-12-07, of which `jaxlm eval` (all 232 validation batches, then gzip and xz) 46 s.
Expected:  validation loss 1.668 nats/byte = 2.41 bits per byte, perplexity 5.30, on the
           standard library's validation files (gzip -9: 1.75, xz -9: 1.34 bits per byte on the same
           bytes); 2.39 before the kernels, the same model with float32 rounding in another order.
           The model is 3.2M parameters: 4 layers, d_model 256, byte vocabulary.
"""

from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.num_layers = 4
  config.model.d_model = 256
  config.model.num_heads = 4
  config.model.mlp_dim = 1024
  config.model.max_len = 256
  config.data.seq_len = 256
  config.train.global_batch_size = 16
  config.train.num_steps = 600
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  return config
