"""Offline chat fine-tuning: a small byte-level decoder answers "what does this stdlib function do?".

Command:   python experiments/stdlib_chat.py data/stdlib_chat
           jaxlm train --config configs/chat_tiny.py --workdir runs/chat_tiny
           jaxlm eval --workdir runs/chat_tiny
           jaxlm chat --workdir runs/chat_tiny     (or jaxlm serve: POST /v1/chat/completions)
Hardware:  2-core x86-64 CPU (CI-sized machine, shared), float32.
Time:      measured 17.4 min of training (600 steps, 1.1-2.1 s/step) and 14 s of evaluation on a 2-core
           AMD EPYC shared with other jobs (load 14-21), 2026-11-29.
Expected:  measured (one run): validation loss 2.05 nats/byte on the answers (2.19 at step 200, 2.09 at 400),
           3.01 bits/byte beside gzip -9 2.92 and xz -9 2.97 on the same answers compressed alone.
           Greedy answers start as the docstrings do ("Return the ...") and then repeat words: 600 steps
           of a 0.5M-parameter byte model is a plumbing check for chat data, not a useful assistant.
Data: data.source='jsonl' with {"messages": [user, assistant]} records (4,445 train, 166 validation
conversations, split by file as configs/codesum_transformer.py), rendered with the default chat template
(jaxlm/data/chat_template.py); the loss is on the assistant's answer only (its docstring line, `<|end|>` and EOS).
Whole conversations are packed per 512-byte row.
"""

from jaxlm.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.num_layers = 2
  m.d_model = 128
  m.num_heads = 4
  m.mlp_dim = 512
  m.max_len = 512
  c.data.source = "jsonl"
  c.data.paths = "data/stdlib_chat/train.jsonl"
  c.data.validation_paths = "data/stdlib_chat/validation.jsonl"
  c.data.seq_len = 512
  c.train.global_batch_size = 16
  c.train.num_steps = 600
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 20
  c.eval.batch_size = 16
  return c
