"""Default job: a byte-level GPT on the Python standard library's own source.

Command:   jaxlm train --config configs/default.py --workdir runs/default
           jaxlm eval --workdir runs/default
Hardware:  2-core x86-64 CPU (CI-sized machine), float32.
Time:      about 9 minutes of training, plus about 1 minute of evaluation.
Expected:  validation TBD bits per byte (gzip -9: 1.59, xz -9: 1.35 on the same bytes).
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
