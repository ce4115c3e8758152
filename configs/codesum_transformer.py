"""Offline encoder-decoder: summarize stdlib functions (source -> first docstring line), byte-level.

Command:   jaxlm train --config configs/codesum_transformer.py --workdir runs/codesum
           jaxlm eval --workdir runs/codesum
Hardware:  2-core x86-64 CPU (CI-sized machine, shared), float32.
Time:      measured 144 s of training (250 steps, 0.28-0.51 s/step) and 46 s of evaluation (beam
           search over all 216 validation pairs), on a 2-core AMD EPYC with one other job, 2026-11-30.
Expected:  measured 2026-11-30 (one run): validation loss 2.28 nats/byte, sacrebleu BLEU 0.73, beside
           the baselines' BLEU on the same references: most common training summary 0.07, the
           function's name split into words 0.14. (The first run, 2026-11-28, scored 2.25 and BLEU 0.18
           on the 315 validation pairs of an earlier extraction.) BLEU under 1 is noise on 216 pairs:
           250 steps is far too short for byte-level summaries; it is a plumbing check, not a strong
           summarizer.
The architecture is the paper's (post-norm, sinusoidal positions, shared
scaled embeddings, label smoothing 0.1, the inverse-square-root schedule,
beam 4 with alpha 0.6), shrunk to fit the CPU.
"""

from jaxlm.config import base_config

PAPER_PARAMS = None  # no paper figure: the baseline in the docstring is the reference


def get_config():
  c = base_config()
  m = c.model
  m.family = "encoder_decoder"
  m.num_layers = 2  # encoder; the decoder has as many (num_decoder_layers=0)
  m.d_model = 128
  m.num_heads = 4
  m.mlp_dim = 512
  m.max_len = 192
  m.position = "sinusoidal"
  m.norm_position = "post"
  m.mlp = "relu"
  m.scale_embeddings = True
  m.dropout_rate = 0.0  # the paper's 0.1 only slows a run this short, which underfits
  c.data.source = "codesum"
  c.data.val_fraction = 0.05  # codesum's default split
  c.data.seq_len = 192  # source bytes: the signature and the first lines of the body
  c.data.target_len = 80  # summaries are 49 bytes at the median, 73 at the 99th percentile
  c.train.global_batch_size = 32
  c.train.num_steps = 250
  c.train.log_every = 25
  c.train.eval_every = 125
  c.train.checkpoint_every = 125
  c.train.label_smoothing = 0.1
  c.optim.name = "adamw"
  c.optim.schedule = "transformer"
  c.optim.learning_rate = 0.5  # multiplies the paper's d_model^-0.5 * min(...): small models take a larger peak
  c.optim.warmup_steps = 100
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-9
  c.optim.weight_decay = 0.0
  c.eval.batch_size = 32
  c.eval.beam_size = 4
  c.eval.length_penalty = 0.6
  return c
