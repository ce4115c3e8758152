"""The "design notes" example model: decoder-only, vocab 10000, d_model 512, 8 heads, 6 layers, Adam.

Command:   jaxlm train --config configs/design_notes.py --workdir runs/design_notes
           jaxlm eval --workdir runs/design_notes
Hardware:  one GPU or TPU chip (a CPU works, slowly: about 24M parameters).
Time:      5000 steps of 32 x 256 tokens; under an hour on one accelerator (estimate, not measured).
Expected:  no paper figure; eval prints bits per byte beside gzip -9 and xz -9 on the same bytes.
Data:      the Python standard library's source (offline); a 10000-id SentencePiece vocabulary is trained
           on its training split on first use, at runs/design_notes_spm.model (relative to the working directory).
"""

from jaxlm.config import base_config

PAPER_PARAMS = None


def get_config():
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_heads, m.num_layers, m.mlp_dim = 10000, 512, 8, 6, 2048
  c.data.tokenizer = "sentencepiece"
  c.data.tokenizer_path = "runs/design_notes_spm.model"
  c.data.spm_vocab_size = 9999  # + [MASK] = 10000 ids
  c.data.seq_len = m.max_len = 256
  c.train.global_batch_size = 32
  c.train.num_steps = 5000
  c.optim.weight_decay = 0.0  # plain Adam
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 500
  return c
