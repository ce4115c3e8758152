"""ALiBi's length extrapolation (Press et al. 2022, "Train short, test long"): experiments/alibi_length.py.

A 3-layer byte-level GPT (d_model 128, 4 heads) trained on the default corpus at 128 tokens, once per position
method (`model.position`: alibi, rope, sinusoidal, learned), then scored on 1x, 2x and 4x that length: the same
32,768 bytes of jaxlm's own Python files (not in the training corpus) cut into non-overlapping windows, as
Press et al.'s Figure 1. `model.max_len` is 4x the training length so that the learned table has a row for
every position scored (the rows past 128 are never trained: that is the method's extrapolation).

Command:   python experiments/alibi_length.py   (writes docs/img/alibi_length.json and .png)
           python experiments/alibi_length.py --smoke   (alibi only, 4 steps: what CI checks)
Hardware:  2-core x86-64 CPU (AMD EPYC), float32.
Time:      20.2, 5.3, 2.6 and 5.0 min per method (training and scoring) beside other jobs (load average 3-9);
           --steps 150 took 9.0, 4.0, 1.9 and 1.1 min under a load average of 30 to 4.
Expected:  ALiBi's perplexity stays flat or falls at 2x and 4x; learned and sinusoidal positions degrade sharply
           past the training length, rotary less so. Measured (perplexity per byte at 1x / 2x / 4x):
           alibi 10.45 / 10.30 / 10.22, rope 9.15 / 9.86 / 12.71, learned 11.08 / 21.15 / 29.84,
           sinusoidal 21.58 / 48.62 / 86.45 (docs/reproductions.md).
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
