"""Offline BERT: masked-LM pretraining on the Python standard library's source, byte-level.

Command:   jaxlm train --config configs/stdlib_bert.py --workdir runs/stdlib_bert
           jaxlm eval --workdir runs/stdlib_bert
Hardware:  2-core x86-64 CPU (CI-sized machine, shared), float32.
Time:      measured 1038 s of training (350 steps) and 68 s of evaluation on a 2-core CPU shared with
           other jobs (load ~6; about half that on an idle machine, from the 1.5 s/step measured there).
Expected:  measured 2026-11 (one run, eval.max_batches=50): MLM loss 2.71, accuracy 0.395 on the masked
           bytes, beside the unigram baseline (always ' ', the most common training byte) at 0.340.
BERT's recipe (post-norm, learned positions, embedding LayerNorm, token
types, 15% masking with 80/10/10, MLM head tied to the embeddings), shrunk.
"""

from jaxlm.config import base_config

PAPER_PARAMS = None  # no paper figure: the baseline in the docstring is the reference


def get_config():
  c = base_config()
  m = c.model
  m.family = "encoder"
  m.mlp = "gelu_exact"
  m.num_layers = 4
  m.d_model = 192
  m.num_heads = 4
  m.mlp_dim = 768
  m.max_len = 128
  m.norm_position = "post"
  m.norm_eps = 1e-12
  m.embed_norm = True
  m.num_token_types = 2
  m.dropout_rate = 0.0  # underfitting, not overfitting, is the risk in a 10-minute run
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.train.global_batch_size = 32
  c.train.num_steps = 350
  c.train.log_every = 25
  c.train.eval_every = 175
  c.train.checkpoint_every = 175
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.eval.batch_size = 32
  c.eval.max_batches = 50
  return c
