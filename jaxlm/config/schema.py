"""The config schema: every key once, with its default, its comment, the values it accepts and what it says
about the weights.

`base_config()` holds the defaults and, beside each, the comment `jaxlm config show` prints. `RANGES` and
`_CHOICES` say what each key accepts, except the keys whose choices their registries own
(`_REGISTERED`: `model.family`, `model.attention_impl`, `model.moe_dispatch`, `data.source`), read when asked so
that a family, attention implementation, MoE dispatch or data source registered from outside is accepted like a
built-in one.
`WEIGHTS_FREE` marks the model keys that do not change the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections

ConfigDict = ml_collections.ConfigDict
# Type hints that say which a function takes: the whole config (parameter `config`), or its `model`
# section (parameter `model_cfg`). Both are ConfigDicts; the names are for the reader.
Config = ConfigDict
ModelConfig = ConfigDict


# Logical axis name -> mesh axes. One short table, as in Flax's lm1b example:
# batch rows split over data and fsdp, weights split over fsdp along the
# embedding dimension and over tensor along heads/mlp/vocab.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp", "expert")),
  ("length", None),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("expert", "expert"),
  ("layers", None),
  ("norm", None),
)


def base_config() -> ConfigDict:
  """The full schema with defaults: a small byte-level GPT on the stdlib corpus."""
  c = ConfigDict()
  c.seed = 0

  c.model = ConfigDict()
  c.model.family = "decoder"  # a registered family (jaxlm.families): decoder, encoder, encoder_decoder, ...
  c.model.vocab_size = 260  # byte tokenizer: 256 bytes + pad, bos, eos, mask
  c.model.num_layers = 4
  c.model.num_decoder_layers = 0  # encoder_decoder only; 0 means num_layers
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 means num_heads (multi-head attention)
  c.model.head_dim = 0  # 0 means d_model // num_heads
  c.model.mlp_dim = 1024
  c.model.max_len = 256  # positions the model supports
  c.model.norm = "layernorm"  # layernorm | rmsnorm
  c.model.norm_eps = 1e-5
  c.model.norm_position = "pre"  # pre | post
  c.model.position = "learned"  # learned | rope | sinusoidal | alibi (a bias on the scores; docs/extending.md)
  c.model.rope_theta = 10000.0
  c.model.mlp = "gelu"  # gelu (tanh, GPT-2) | gelu_exact (erf, BERT) | swiglu | relu | squared_relu (Primer)
  c.model.parallel_residual = False  # GPT-J/PaLM block: x + attn(norm(x)) + mlp(norm(x)); pre-norm, no cross-attention
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.scale_embeddings = False  # multiply embeddings by sqrt(d_model), as Vaswani et al.
  c.model.num_token_types = 0  # BERT segment embeddings; 0 disables
  c.model.num_classes = 0  # encoder_classifier / decoder_classifier: labels of the task (docs/tasks.md)
  c.model.embed_norm = False  # BERT: LayerNorm over the summed embeddings
  c.model.dropout_rate = 0.0
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"  # storage dtype of the master weights
  c.model.scan_layers = False
  c.model.remat_policy = "none"  # none | full | dots | dots_no_batch
  c.model.attention_impl = "xla"  # xla | cudnn (GPU) | splash (TPU Pallas) | triton (GPU Pallas); jaxlm/ops/
  c.model.attention_block_size = 0  # splash/triton query and key tile (multiple of 128 for splash); 0: 512 / 128
  c.model.cpu_kernels = True  # CPU backend, float32: fused attention and norm kernels (jaxlm/ops/cpu_kernels.py)
  c.model.sow_attention_weights = (
    False  # attention on XLA's code, weights sown into 'intermediates' (docs/extending.md)
  )
  # Mixture of experts (docs/moe.md): SwiGLU experts in place of the MLP, top-k routed (jaxlm/models/moe.py).
  c.model.moe_experts = 0  # experts per MoE layer; 0: the dense MLP
  c.model.moe_top_k = 2  # experts each token goes to
  c.model.moe_shared_experts = 0  # always-on experts: one dense SwiGLU MLP of width moe_shared_experts x moe_hidden
  c.model.moe_dispatch = "dropless"  # a registered dispatch (jaxlm/ops/moe.py): dropless, capacity, dense
  c.model.moe_capacity_factor = 1.25  # capacity: slots per expert = ceil(factor x tokens per row x top_k / experts)
  c.model.moe_aux_loss_weight = 0.01  # load-balancing loss (Switch): experts x sum_e tokens_e x probability_e
  c.model.moe_z_loss_weight = 0.001  # router z-loss (ST-MoE): mean logsumexp(router logits)^2
  c.model.moe_every = 1  # every n-th layer is MoE (layers n-1, 2n-1, ...); >1 needs scan_layers=False
  c.model.moe_hidden = 0  # expert FFN width; 0 means mlp_dim

  c.data = ConfigDict()
  c.data.source = "stdlib"  # a registered data source (jaxlm/data/sources.py): stdlib, files, tfds, ...
  c.data.paths = ""  # comma-separated files or globs for source=files or jsonl (docs/fine-tuning.md)
  c.data.prepared_dir = ""  # source=prepared: a `jaxlm prepare --out` folder (train/, validation/) (docs/data.md)
  c.data.mixture = ""  # source=prepared: "[(DIR, WEIGHT), ...]" prepared folders mixed by weight for training
  c.data.validation_paths = (
    ""  # source=files or jsonl: validation files or globs; empty: split data.paths (docs/data.md)
  )
  c.data.include_tests = False  # stdlib: include the test folders
  c.data.val_fraction = 0.03
  c.data.tokenizer = "byte"  # byte | sentencepiece | huggingface (tokenizer_path: a folder with tokenizer.json)
  c.data.tokenizer_path = ""
  c.data.seq_len = 256
  c.data.shuffle_seed = 0
  c.data.prefetch_threads = 0  # grain read threads; 0 reads in the main thread
  c.data.target_len = 0  # target tokens per row (0: seq_len): encoder_decoder, or a decoder on codesum
  c.data.max_examples = 0  # tfds/codesum: read at most this many examples per split; 0 reads all
  c.data.doc_stride = 128  # squad: a long context is windowed, a new window every doc_stride tokens
  c.data.mlm_probability = 0.15  # encoder: share of tokens chosen for MLM (BERT: 80% [MASK], 10% random, 10% kept)
  c.data.mlm_seed = 0  # MLM masks are a function of (mlm_seed, row index)
  # data.source='tfds': datasets prepared as array_record (docs/datasets.md), read without TensorFlow.
  c.data.tfds_name = ""  # e.g. lm1b, tiny_shakespeare, wmt14_translate/de-en
  c.data.tfds_data_dir = ""  # the prepared data's directory; empty: TFDS's default (~/tensorflow_datasets)
  c.data.tfds_train_split = "train"
  c.data.tfds_eval_split = "validation"  # lm1b has no validation split: use 'test'
  c.data.text_key = "text"  # language modelling: the feature holding the text
  c.data.source_key = ""  # translation: the source language feature, e.g. 'en'
  c.data.target_key = ""  # translation: the target language feature, e.g. 'de'
  c.data.spm_vocab_size = 0  # >0: train a SentencePiece vocabulary of this size at tokenizer_path if missing

  c.train = ConfigDict()
  c.train.global_batch_size = 16
  c.train.num_micro_batches = 1  # gradient accumulation inside the step
  c.train.num_steps = 1000
  c.train.stop_at_step = 0  # stop early, as a preemption would (resume later); 0 runs to num_steps
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.z_loss = 0.0
  c.train.label_smoothing = 0.0
  c.train.compilation_cache_dir = ""  # persistent XLA compilation cache; empty disables
  c.train.init_from = (
    ""  # a new run from this run's parameters (train or convert --from-hf workdir; jaxlm/training/init_from.py)
  )
  c.train.init_from_step = -1  # its checkpoint; -1: the newest (recorded in this run's config.json)
  c.train.wandb = ""  # a Weights & Biases project: also log there (pip install -e '.[wandb]'); empty: off
  c.train.profile_steps = ""  # FIRST:LAST, e.g. 5:8: jax.profiler trace of those steps into RUN/profile/HOST

  c.optim = ConfigDict()
  c.optim.name = "adamw"  # adamw | adafactor | lion
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "cosine"  # cosine | linear | rsqrt | constant | transformer
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.1  # cosine/linear decay to this fraction of the peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False
  c.optim.clip_norm = 1.0  # 0 disables

  c.lora = ConfigDict()  # low-rank adapters over a frozen base run (jaxlm/models/lora.py)
  c.lora.rank = 0  # 0: no adapters (full training); r > 0 trains only rank-r adapters
  c.lora.alpha = 16.0  # the kernel becomes W + (alpha / rank) * A @ B
  c.lora.dropout = 0.0  # drops input features of A, one mask per step (adapters are merged per step)
  c.lora.targets = "query,value"  # comma-separated projections: query, key, value, out, up, gate, down
  c.lora.base_workdir = ""  # the run whose weights stay frozen (train or convert --from-hf workdir)
  c.lora.base_step = -1  # its checkpoint; -1: the latest (recorded in the LoRA run's config.json)
  c.lora.base_checksum = ""  # recorded at the run's start: a digest of that checkpoint's parameter checksums

  c.eval = ConfigDict()
  c.eval.batch_size = 16
  c.eval.max_batches = 0  # 0 evaluates the whole validation split
  c.eval.beam_size = 4  # encoder_decoder BLEU: beam search as Vaswani et al. (beam 4, alpha 0.6)
  c.eval.length_penalty = 0.6  # GNMT alpha
  c.eval.max_decode_len = 0  # generated tokens; 0 means data.target_len (or seq_len)
  c.eval.bleu_examples = 0  # validation pairs translated for BLEU; 0: all

  c.mesh = ConfigDict()
  c.mesh.data = -1  # -1 takes the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.expert = 1  # expert parallelism: MoE experts split over it, batch rows too (docs/moe.md)
  c.mesh.tensor = 1
  c.mesh.rules = json.dumps(DEFAULT_RULES)  # JSON so it can be overridden on the command line

  c.distributed = ConfigDict()
  c.distributed.coordinator_address = ""  # or env JAX_COORDINATOR_ADDRESS
  c.distributed.num_processes = 0  # or env JAX_NUM_PROCESSES; 0: one process, -1: detect (TPU, SLURM)
  c.distributed.process_id = -1  # or env JAX_PROCESS_ID
  c.distributed.initialization_timeout_s = 300  # how long each process waits for all the others to join
  c.distributed.initialization_attempts = 3  # tries of jax.distributed.initialize (busy hosts fail spuriously)
  c.distributed.heartbeat_timeout_s = (
    20  # a peer silent this long counts as lost; the others exit (jaxlm/parallel/watchdog.py)
  )
  return c


@dataclasses.dataclass(frozen=True)
class Allowed:
  """The values a config key accepts: numbers in a range (plus special values), a set of choices, or any."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False  # True excludes `low` itself
  high_open: bool = False  # True excludes `high` itself
  also: tuple = ()  # special values outside the range, such as 0 for "off" or -1 for "fill"
  choices: tuple = ()
  note: str = ""  # shown for keys without a numeric range, e.g. "a path or glob"

  def describe(self) -> str:
    """The accepted values as text, e.g. '>= 1', '[0, 1)', 'decoder | encoder'."""
    if self.choices:
      return " | ".join(self.choices)
    if self.low is None and self.high is None:
      return self.note or "any"
    if self.high is None:
      text = f"{'>' if self.low_open else '>='} {self.low:g}"
    elif self.low is None:
      text = f"{'<' if self.high_open else '<='} {self.high:g}"
    else:
      text = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    return text + "".join(f" or {value}" for value in self.also)

  def accepts(self, value) -> bool:
    if self.choices:
      return value in self.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return True
    if value in self.also:
      return True
    if not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      return False
    return self.high is None or (value < self.high or (not self.high_open and value == self.high))


def _at_least(low, *also) -> Allowed:
  return Allowed(low=low, also=also)


_POSITIVE, _COUNT, _FRACTION, _OPEN_FRACTION = _at_least(1), _at_least(0), Allowed(0, 1), Allowed(0, 1, True, True)
_POSITIVE_REAL, _BOOL, _TEXT = Allowed(0, low_open=True), Allowed(note="True | False"), Allowed(note="text")
_BETA = Allowed(0, 1, high_open=True)

# What every schema key accepts, next to base_config's defaults and comments (`jaxlm config show` prints all
# three). Keys with choices are in _CHOICES or _REGISTERED below; tests/unit/test_config.py checks that every key
# is in one of them.
RANGES = {
  "seed": _COUNT,
  "model.vocab_size": _POSITIVE,
  "model.num_layers": _POSITIVE,
  "model.num_decoder_layers": _COUNT,
  "model.d_model": _POSITIVE,
  "model.num_heads": _POSITIVE,
  "model.num_kv_heads": _COUNT,
  "model.head_dim": _COUNT,
  "model.mlp_dim": _POSITIVE,
  "model.max_len": _at_least(1),
  "model.norm_eps": _POSITIVE_REAL,
  "model.rope_theta": _POSITIVE_REAL,
  "model.use_bias": _BOOL,
  "model.tie_embeddings": _BOOL,
  "model.scale_embeddings": _BOOL,
  "model.num_token_types": _COUNT,
  "model.num_classes": _COUNT,
  "model.embed_norm": _BOOL,
  "model.dropout_rate": _BETA,
  "model.scan_layers": _BOOL,
  "model.cpu_kernels": _BOOL,
  "model.parallel_residual": _BOOL,
  "model.sow_attention_weights": _BOOL,
  "model.attention_block_size": _COUNT,
  "model.moe_experts": _COUNT,
  "model.moe_top_k": _POSITIVE,
  "model.moe_shared_experts": _COUNT,
  "model.moe_capacity_factor": _POSITIVE_REAL,
  "model.moe_aux_loss_weight": _at_least(0),
  "model.moe_z_loss_weight": _at_least(0),
  "model.moe_every": _POSITIVE,
  "model.moe_hidden": _COUNT,
  "data.paths": Allowed(note="comma-separated paths or globs"),
  "data.validation_paths": Allowed(note="comma-separated paths or globs"),
  "data.include_tests": _BOOL,
  "data.val_fraction": _OPEN_FRACTION,
  "data.tokenizer_path": Allowed(note="a path"),
  "data.seq_len": _POSITIVE,
  "data.shuffle_seed": _COUNT,
  "data.prefetch_threads": _COUNT,
  "data.target_len": _COUNT,
  "data.max_examples": _COUNT,
  "data.doc_stride": _POSITIVE,
  "data.mlm_probability": Allowed(0, 1, low_open=True),
  "data.mlm_seed": _COUNT,
  "data.tfds_name": _TEXT,
  "data.tfds_data_dir": Allowed(note="a directory"),
  "data.tfds_train_split": _TEXT,
  "data.tfds_eval_split": _TEXT,
  "data.text_key": _TEXT,
  "data.source_key": _TEXT,
  "data.target_key": _TEXT,
  "data.spm_vocab_size": _COUNT,
  "data.prepared_dir": Allowed(note="a directory"),
  "data.mixture": Allowed(note="[(DIR, WEIGHT), ...]"),
  "train.global_batch_size": _POSITIVE,
  "train.num_micro_batches": _POSITIVE,
  "train.num_steps": _POSITIVE,
  "train.stop_at_step": _COUNT,
  "train.log_every": _POSITIVE,
  "train.eval_every": _POSITIVE,
  "train.eval_batches": _POSITIVE,
  "train.checkpoint_every": _POSITIVE,
  "train.keep_checkpoints": _POSITIVE,
  "train.z_loss": _at_least(0),
  "train.label_smoothing": _BETA,
  "train.compilation_cache_dir": Allowed(note="a directory"),
  "train.init_from": Allowed(note="a run directory"),
  "train.init_from_step": _at_least(0, -1),
  "train.wandb": Allowed(note="a W&B project name; empty: off"),
  "train.profile_steps": Allowed(note="FIRST:LAST steps, e.g. 5:8; empty: off"),
  "optim.learning_rate": _POSITIVE_REAL,
  "optim.warmup_steps": _COUNT,
  "optim.end_lr_fraction": _FRACTION,
  "optim.b1": _BETA,
  "optim.b2": _BETA,
  "optim.eps": _at_least(0),
  "optim.weight_decay": _at_least(0),
  "optim.decay_embeddings": _BOOL,
  "optim.clip_norm": _at_least(0),
  "lora.rank": _COUNT,
  "lora.alpha": _POSITIVE_REAL,
  "lora.dropout": _BETA,
  "lora.targets": Allowed(note="comma-separated projection names"),
  "lora.base_workdir": Allowed(note="a run directory"),
  "lora.base_step": _at_least(0, -1),
  "lora.base_checksum": Allowed(note="recorded by `jaxlm train`; '' checks nothing"),
  "eval.batch_size": _POSITIVE,
  "eval.max_batches": _COUNT,
  "eval.beam_size": _COUNT,
  "eval.length_penalty": _at_least(0),
  "eval.max_decode_len": _COUNT,
  "eval.bleu_examples": _COUNT,
  "mesh.data": _at_least(1, -1),
  "mesh.fsdp": _at_least(1, -1),
  "mesh.expert": _at_least(1, -1),
  "mesh.tensor": _at_least(1, -1),
  "mesh.rules": Allowed(note="JSON list of [logical, mesh axes]"),
  "distributed.coordinator_address": Allowed(note="host:port"),
  "distributed.num_processes": _at_least(0, -1),
  "distributed.process_id": _at_least(0, -1),
  "distributed.initialization_timeout_s": _POSITIVE,
  "distributed.initialization_attempts": _POSITIVE,
  "distributed.heartbeat_timeout_s": _at_least(2),
}


def leaves(config: ConfigDict, prefix: str = ""):
  """Every leaf of `config`, depth first in insertion order.

  Args:
    config: a config or one of its sections.
    prefix: prepended to every key (the section's own path and a dot, when recursing).

  Returns:
    An iterator of (dotted key, value) pairs, e.g. ('model.d_model', 384).
  """
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      yield from leaves(value, name + ".")
    else:
      yield name, value


def _get(config: ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


_CHOICES = {
  "model.norm": ("layernorm", "rmsnorm"),
  "model.norm_position": ("pre", "post"),
  "model.position": ("learned", "rope", "sinusoidal", "alibi"),
  "model.mlp": ("gelu", "gelu_exact", "swiglu", "relu", "squared_relu"),
  "model.dtype": ("float32", "bfloat16", "float16"),
  "model.param_dtype": ("float32", "bfloat16"),
  "model.remat_policy": ("none", "full", "dots", "dots_no_batch"),
  "data.tokenizer": ("byte", "sentencepiece", "huggingface"),
  "optim.name": ("adamw", "adafactor", "lion"),
  "optim.schedule": ("cosine", "linear", "rsqrt", "constant", "transformer"),
}


def _family_names() -> tuple[str, ...]:
  from jaxlm import families  # local: the registry imports its families at first use

  return families.names()


def _attention_names() -> tuple[str, ...]:
  from jaxlm.ops import dispatch  # local: imports JAX, which the schema alone does not need

  # An automatic implementation (the CPU kernels) is chosen by the dispatcher, never named by a config.
  return tuple(name for name, implementation in dispatch.REGISTRY["attention"].items() if not implementation.automatic)


def _moe_dispatch_names() -> tuple[str, ...]:
  from jaxlm.ops import moe  # local: imports JAX, which the schema alone does not need

  return tuple(moe.REGISTRY)


def _source_names() -> tuple[str, ...]:
  from jaxlm.data import sources  # local: the registry imports its sources at first use

  return sources.names()


# Keys whose choices are what their registry holds when asked, so that entries registered from outside count.
_REGISTERED = {
  "model.family": _family_names,
  "model.attention_impl": _attention_names,
  "model.moe_dispatch": _moe_dispatch_names,
  "data.source": _source_names,
}


def allowed(key: str) -> Allowed:
  """What a config key accepts.

  Args:
    key: a dotted schema key, e.g. 'model.num_heads'.

  Returns:
    Its `Allowed` values: the registry's names for the keys of `_REGISTERED`;
    anything, for a key missing from the tables (a test flags those).
  """
  if key in _REGISTERED:
    return Allowed(choices=_REGISTERED[key]())
  if key in _CHOICES:
    return Allowed(choices=_CHOICES[key])
  return RANGES.get(key, Allowed())


# What a model key says about the weights, read by the code that carries weights between runs and formats
# (`jaxlm.hf` and `train.init_from`), so a new key is classified here once:
#   'runtime': how a run computes with the weights (dropout, compute dtype, remat, kernels, introspection);
#   'task': which task head a run trains, chosen by a run that starts from another run's body;
#   'storage': how the weights are stored (their dtype, stacked layers), not what they compute;
#   'size': sizes and constants that a weights converter maps to its own config.
# Any other model key (layout, normalization, positions, ...) fixes what the weights compute.
WEIGHTS_FREE = {
  "family": "task",
  "vocab_size": "size",
  "num_layers": "size",
  "d_model": "size",
  "num_heads": "size",
  "mlp_dim": "size",
  "max_len": "size",
  "norm_eps": "size",
  "num_classes": "task",
  "dropout_rate": "runtime",
  "dtype": "runtime",
  "param_dtype": "storage",
  "scan_layers": "storage",
  "remat_policy": "runtime",
  "attention_impl": "runtime",
  "attention_block_size": "runtime",
  "cpu_kernels": "runtime",
  "sow_attention_weights": "runtime",
  "moe_dispatch": "runtime",
  "moe_capacity_factor": "runtime",
  "moe_aux_loss_weight": "runtime",
  "moe_z_loss_weight": "runtime",
}


def model_keys(*kinds: str) -> tuple[str, ...]:
  """The model keys that `WEIGHTS_FREE` marks with one of `kinds`.

  Args:
    kinds: any of 'runtime', 'task', 'storage', 'size'.

  Returns:
    Their names without the 'model.' prefix, in `base_config()`'s order (as `WEIGHTS_FREE` lists them).
  """
  return tuple(key for key, kind in WEIGHTS_FREE.items() if kind in kinds)
