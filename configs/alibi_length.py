"""ALiBi's length extrapolation (Press et al. 2022, "Train short, test long"): experiments/alibi_length.py.

A 3-layer byte-level GPT (d_model 128, 4 heads) trained on the default corpus at 128 tokens, once per position
method (`model.position`: alibi, rope, sinusoidal, learned), then scored on 1x, 2x and 4x that length: the same
32,768 bytes of jaxlm's own Python files (not in the training corpus) cut into non-overlapping windows, as
Press et al.'s Figure 1. `model.max_len` is 4x the training length so that the learned table has a row for
every position scored (the rows past 128 are never trained: that is the method's extrapolation).

Command:   python experiments/alibi_length.py   (writes docs/img/alibi_length.json and .png)
           python experiments/alibi_length.py --smoke   (alibi only, 4 steps: what CI checks)
Hardware:  2-core x86-64 CPU shared with 7 other jobs, float32.
Time:      the full 4 x 1,000 steps not yet measured; --steps 150 took 9.0, 4.0, 1.9 and 1.1 min per method
           (training and scoring) as the load average fell from 30 to 4.
Expected:  ALiBi's perplexity stays flat or falls at 2x and 4x; learned and sinusoidal positions degrade sharply
           past the training length, rotary less so. Measured at --steps 150 (perplexity per byte at 1x / 4x):
           alibi 17.92 / 17.83, rope 17.71 / 18.24, learned 20.73 / 21.27, sinusoidal 37.50 / 37.58 (undertrained).
"""

from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.num_layers = 3
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.position = "alibi"  # the script trains each of alibi, rope, sinusoidal, learned
  config.model.max_len = 512  # 4x the training length: positions the evaluation reaches
  config.data.seq_len = 128
  config.train.global_batch_size = 16
  config.train.num_steps = 1000
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 1
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  return config
