"""The speed-benchmark reference: the model that `benchmarks/torch_peer.py` also builds.

GPT, 6 layers, d_model 384, 6 heads, seq 256, batch 16, vocab 256, pre-LayerNorm,
tanh GELU, learned positions, tied embeddings, biases, no dropout, float32, AdamW
with global-norm clipping at a constant learning rate (as the peer has no schedule).

Command:   python benchmarks/train_speed.py      (see BENCHMARKS.md)
Hardware:  any; the figures in BENCHMARKS.md are from a 2-core x86-64 CPU.
Time:      about 2 minutes for `train_speed.py --rounds 7 --steps 2` on 2 cores (compiles included).
Expected:  on a quiet 2-core CPU with `pip install -e '.[bench]'` (MKL), about 1.07 s/step = 3,800
           tokens/s = 71% MFU for jaxlm, ratio 1.14 to the PyTorch peer (2026-11-29, 00:00 UTC);
           ratio 1.03 with OpenBLAS only, 0.82 with --config.model.cpu_kernels=False. Random
           tokens, so the loss is not a metric here.
"""

from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.vocab_size = 256  # the benchmark feeds random tokens below 256
  config.model.num_layers = 6
  config.model.d_model = 384
  config.model.num_heads = 6
  config.model.mlp_dim = 1536
  config.model.max_len = 256
  config.model.mlp = "gelu"
  config.model.position = "learned"
  config.model.norm = "layernorm"
  config.model.norm_position = "pre"
  config.model.use_bias = True
  config.model.tie_embeddings = True
  config.model.dropout_rate = 0.0
  config.data.seq_len = 256
  config.train.global_batch_size = 16
  config.optim.name = "adamw"
  config.optim.learning_rate = 3e-4
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.1
  config.optim.clip_norm = 1.0
  return config
