"""Tiny smoke run: a 2-layer, d_model 32 byte-level GPT on the standard library.

Command:   jaxlm train --config configs/tiny.py --workdir runs/tiny && jaxlm eval --workdir runs/tiny
Hardware:  any CPU.
Time:      about 1 minute on 2 cores.
Expected:  validation loss falls below 3.0 nats/byte (about 4.3 bits per byte); this config
           checks the plumbing, not the model. Tests use it with their own small corpus.
"""

from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.num_layers = 2
  config.model.d_model = 32
  config.model.num_heads = 4
  config.model.mlp_dim = 64
  config.model.max_len = 64
  config.data.seq_len = 32
  config.train.global_batch_size = 8
  config.train.num_steps = 200
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 20
  config.eval.batch_size = 8
  config.eval.max_batches = 50
  return config
