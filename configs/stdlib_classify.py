"""Offline classification: which of ten standard-library packages a function comes from, BERT-style encoder.

Command:   jaxlm train --config configs/stdlib_classify.py --workdir runs/stdlib_classify
           jaxlm eval --workdir runs/stdlib_classify
           experiments/classify.sh runs   (also the decoder, last token: model.family=decoder_classifier)
Hardware:  2-core x86-64 CPU (CI-sized machine, shared with other jobs), float32.
Time:      measured 266 s of training (300 steps, 4.4 min) and 56 s for `jaxlm eval` (839 functions, with both
           baselines) on a 2-core CPU shared with other jobs (load 12-17).
Expected:  measured 2026-11-29 (one run each, 839 validation functions):
             this config (post-norm encoder, [CLS]), 300 steps: accuracy 0.285, macro P/R/F1 0.065/0.147/0.087
             pre-norm encoder, 400 steps:                     accuracy 0.312, macro P/R/F1 0.132/0.215/0.162
             decoder_classifier (pre-norm, last token), 300:  accuracy 0.330, macro P/R/F1 0.181/0.218/0.180
             majority class (asyncio):                        accuracy 0.217, macro F1 0.036
             naive Bayes on identifier words:                 accuracy 0.863, macro P/R/F1 0.896/0.828/0.853
           A few minutes of a byte-level model from scratch beat the majority class but stay far below the
           bag-of-words baseline: the package is mostly in the identifiers, which naive Bayes sees whole.
Task: `jaxlm.tasks.classify` (3506 train / 839 validation functions at val_fraction 0.2, split by qualified-name
hash); metrics: accuracy and macro precision/recall/F1 (`jaxlm.tasks.metrics`) with a per-class table.
"""

from jaxlm.config import base_config

PAPER_PARAMS = None  # no paper figure: the baselines in the docstring are the reference


def get_config():
  c = base_config()
  m = c.model
  m.family = "encoder_classifier"
  m.num_classes = 10
  m.mlp = "gelu_exact"
  m.num_layers = 2
  m.d_model = 128
  m.num_heads = 4
  m.mlp_dim = 512
  m.max_len = 256
  m.norm_position = "post"
  m.norm_eps = 1e-12
  m.embed_norm = True
  m.num_token_types = 2
  m.dropout_rate = 0.0
  c.data.source = "stdlib_packages"
  c.data.val_fraction = 0.2
  c.data.seq_len = 256
  c.train.global_batch_size = 32
  c.train.num_steps = 300
  c.train.log_every = 25
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.eval.batch_size = 32
  c.eval.max_batches = 0
  return c
