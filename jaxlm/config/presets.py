"""Paper architectures and recipes shared by `configs/*.py`, so each config file stays a few lines.

Every function returns a `base_config()` changed to the paper's model and
optimizer; data settings point at TFDS datasets prepared as in
docs/datasets.md. Parameter counts are checked against the papers in
tests/unit/test_configs.py.
"""

from __future__ import annotations

from jaxlm.config import ConfigDict, base_config


def _large_model_defaults(c: ConfigDict) -> None:
  """Scanned layers keep compile time flat in depth; rematerialization keeps activations small."""
  c.model.scan_layers = True
  c.model.remat_policy = "dots_no_batch"
  c.model.dtype = "bfloat16"
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.train.checkpoint_every = 2000
  c.train.eval_batches = 50
  c.data.prefetch_threads = 4


def _spm(c: ConfigDict, path: str, vocab_size: int) -> None:
  """A SentencePiece vocabulary trained on the training text on first use; [MASK] takes the last id."""
  c.data.tokenizer = "sentencepiece"
  c.data.tokenizer_path = path
  c.data.spm_vocab_size = vocab_size - 1
  c.model.vocab_size = vocab_size


def gpt(
  num_layers: int,
  d_model: int,
  num_heads: int,
  head_dim: int = 0,
  context: int = 1024,
  batch_size: int = 512,
  learning_rate: float = 6e-4,
  total_tokens: float = 300e9,
) -> ConfigDict:
  """GPT-2/GPT-3: pre-norm decoder, learned positions, GELU MLP of 4 d_model, tied 50257-token embeddings.

  Data: C4 (English) through TFDS, with a 50257-id SentencePiece vocabulary
  in place of GPT-2's byte-level BPE, which jaxlm does not implement.
  Optimizer as GPT-3 (Brown et al., 2020, appendix B): Adam b2 0.95, clip 1.0,
  weight decay 0.1, 375M warmup tokens, cosine decay to 10%.
  """
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.head_dim = num_layers, d_model, num_heads, head_dim
  m.mlp_dim = 4 * d_model
  m.max_len = context
  m.vocab_size = 50257
  _spm(c, "tokenizers/c4_en_50257.model", 50257)
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en"
  c.data.seq_len = context
  _large_model_defaults(c)
  c.train.global_batch_size = batch_size
  c.train.num_steps = int(total_tokens / (c.train.global_batch_size * context))
  c.optim.learning_rate = learning_rate
  c.optim.warmup_steps = int(375e6 / (c.train.global_batch_size * context))
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.1
  return c


# GPT-3 Table 2.1: name -> (params, layers, d_model, heads, d_head, batch in sequences of 2048, learning rate).
# The table's batch sizes in tokens (0.5M, 1M, 2M, 3.2M) are 256, 512, 1024 and 1536 sequences (3.1M).
GPT3_TABLE = {
  "small": (125e6, 12, 768, 12, 64, 256, 6.0e-4),
  "medium": (350e6, 24, 1024, 16, 64, 256, 3.0e-4),
  "large": (760e6, 24, 1536, 16, 96, 256, 2.5e-4),
  "xl": (1.3e9, 24, 2048, 24, 128, 512, 2.0e-4),
  "2.7b": (2.7e9, 32, 2560, 32, 80, 512, 1.6e-4),
  "6.7b": (6.7e9, 32, 4096, 32, 128, 1024, 1.2e-4),
  "13b": (13.0e9, 40, 5140, 40, 128, 1024, 1.0e-4),
  "175b": (175.0e9, 96, 12288, 96, 128, 1536, 0.6e-4),
}


def gpt3(name: str, num_heads: int | None = None) -> ConfigDict:
  """A GPT-3 row: 2048 context, 300B training tokens. `num_heads` overrides the table where it is inconsistent."""
  _, layers, d_model, heads, d_head, batch_size, lr = GPT3_TABLE[name]
  return gpt(
    layers, d_model, num_heads or heads, head_dim=d_head, context=2048, batch_size=batch_size, learning_rate=lr
  )


def transformer(big: bool) -> ConfigDict:
  """Vaswani et al. (2017), Table 3 base/big on WMT'14 English-German (newstest2014 for BLEU).

  Post-norm, sinusoidal positions, ReLU, shared 37000-token vocabulary tied to
  the softmax and scaled by sqrt(d_model), label smoothing 0.1, Adam b2 0.98
  eps 1e-9, the inverse-square-root schedule with 4000 warmup steps, beam 4
  and alpha 0.6. About 25000 source and 25000 target tokens per batch.
  """
  c = base_config()
  m = c.model
  m.family = "encoder_decoder"
  m.num_layers, m.d_model, m.num_heads, m.mlp_dim = (6, 1024, 16, 4096) if big else (6, 512, 8, 2048)
  m.max_len = 256
  m.position, m.norm_position, m.mlp = "sinusoidal", "post", "relu"
  m.scale_embeddings = True
  m.dropout_rate = 0.3 if big else 0.1
  _spm(c, "tokenizers/wmt14_ende_37000.model", 37000)
  c.data.source = "tfds"
  c.data.tfds_name = "wmt14_translate/de-en"
  c.data.tfds_eval_split = "test"  # newstest2014
  c.data.source_key, c.data.target_key = "en", "de"
  c.data.seq_len = c.data.target_len = 256
  _large_model_defaults(c)
  m.remat_policy = "none"
  c.train.global_batch_size = 96  # packed rows of 256 tokens per side
  c.train.num_steps = 300_000 if big else 100_000
  c.train.label_smoothing = 0.1
  c.optim.schedule = "transformer"
  c.optim.learning_rate = 1.0  # exactly the paper's formula
  c.optim.warmup_steps = 4000
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-9
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 0.0
  c.eval.beam_size, c.eval.length_penalty = 4, 0.6
  return c


def bert(large: bool) -> ConfigDict:
  """Devlin et al. (2019): BERT-base/large MLM pretraining (without next-sentence prediction).

  Post-norm, learned positions (512), two token types, embedding LayerNorm,
  exact-GELU MLM head tied to the embeddings, 15% masking (80/10/10).
  Batch 256 x 512 tokens, 1M steps, Adam lr 1e-4, b2 0.999, weight decay
  0.01, 10k warmup steps then linear decay. Data: English Wikipedia from TFDS
  (BooksCorpus is not in TFDS).
  """
  c = base_config()
  m = c.model
  m.family = "encoder"
  m.num_layers, m.d_model, m.num_heads, m.mlp_dim = (24, 1024, 16, 4096) if large else (12, 768, 12, 3072)
  m.max_len = 512
  m.norm_position = "post"
  m.norm_eps = 1e-12
  m.mlp = "gelu_exact"
  m.embed_norm = True
  m.num_token_types = 2
  m.dropout_rate = 0.1
  _spm(c, "tokenizers/wikipedia_en_30522.model", 30522)
  c.data.source = "tfds"
  c.data.tfds_name = "wikipedia/20230601.en"
  c.data.tfds_train_split = "train[:99%]"  # Wikipedia has only a train split
  c.data.tfds_eval_split = "train[99%:]"
  c.data.seq_len = 512
  _large_model_defaults(c)
  c.train.global_batch_size = 256
  c.train.num_steps = 1_000_000
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "linear"
  c.optim.end_lr_fraction = 0.0
  c.optim.warmup_steps = 10_000
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-6
  c.optim.weight_decay = 0.01
  return c


def llama(num_layers: int = 32, d_model: int = 4096, num_heads: int = 32, mlp_dim: int = 11008) -> ConfigDict:
  """LLaMA (Touvron et al., 2023): pre-RMSNorm, RoPE, SwiGLU, no biases, untied 32000-token vocabulary.

  AdamW b2 0.95, weight decay 0.1, clip 1.0, 2000 warmup steps, cosine to
  10%, 4M-token batches of 2048, 1T tokens for the 7B model. Data: C4.
  """
  c = base_config()
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.mlp_dim = num_layers, d_model, num_heads, mlp_dim
  m.max_len = 2048
  m.norm, m.norm_eps, m.position, m.mlp = "rmsnorm", 1e-6, "rope", "swiglu"
  m.use_bias, m.tie_embeddings = False, False
  _spm(c, "tokenizers/c4_en_32000.model", 32000)
  c.data.source = "tfds"
  c.data.tfds_name = "c4/en"
  c.data.seq_len = 2048
  _large_model_defaults(c)
  c.train.global_batch_size = 2048
  c.train.num_steps = int(1e12 / (2048 * 2048))
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-5
  c.optim.weight_decay = 0.1
  return c


def slice_plan(
  c: ConfigDict, *, data: int = 1, fsdp: int = -1, tensor: int = 1, remat_policy: str = "full", micro_batches: int = 1
) -> ConfigDict:
  """Sets the layout a paper config runs with on the TPU slice its docstring names.

  Args:
    c: the config, changed in place.
    data, fsdp, tensor: the mesh axes' sizes (one may be -1: the devices the others leave).
    remat_policy: `model.remat_policy`.
    micro_batches: `train.num_micro_batches`.

  Returns:
    `c`, whose evaluation batch is also one training micro-batch's rows, so that it splits over the same devices.
  """
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.model.remat_policy = remat_policy
  c.train.num_micro_batches = micro_batches
  c.eval.batch_size = c.train.global_batch_size // micro_batches
  return c
