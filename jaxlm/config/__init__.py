"""Configs: the base schema, loading `configs/*.py`, command-line overrides and validation.

Every config file's `get_config()` starts from `base_config()` and changes
fields, so the base is the schema: a key it lacks is a typo, and a value whose
type differs from the base's is a mistake. Both are caught here, before JAX
compiles anything, with one line that names the key and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
from pathlib import Path

import ml_collections

from jaxlm.errors import ConfigError  # noqa: F401 - public here as jaxlm.config.ConfigError

ConfigDict = ml_collections.ConfigDict
# Type hints that say which a function takes: the whole config (parameter `config`), or its `model`
# section (parameter `model_cfg`). Both are ConfigDicts; the names are for the reader.
Config = ConfigDict
ModelConfig = ConfigDict


# Logical axis name -> mesh axes. One short table, as in Flax's lm1b example:
# batch rows split over data and fsdp, weights split over fsdp along the
# embedding dimension and over tensor along heads/mlp/vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def base_config() -> ConfigDict:
  """The full schema with defaults: a small byte-level GPT on the stdlib corpus."""
  c = ConfigDict()
  c.seed = 0

  c.model = ConfigDict()
  c.model.family = "decoder"        # decoder | encoder_decoder | encoder | encoder_qa | encoder_classifier | decoder_classifier
  c.model.vocab_size = 260          # byte tokenizer: 256 bytes + pad, bos, eos, mask
  c.model.num_layers = 4
  c.model.num_decoder_layers = 0    # encoder_decoder only; 0 means num_layers
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 0          # 0 means num_heads (multi-head attention)
  c.model.head_dim = 0              # 0 means d_model // num_heads
  c.model.mlp_dim = 1024
  c.model.max_len = 256             # positions the model supports
  c.model.norm = "layernorm"        # layernorm | rmsnorm
  c.model.norm_eps = 1e-5
  c.model.norm_position = "pre"     # pre | post
  c.model.position = "learned"      # learned | rope | sinusoidal
  c.model.rope_theta = 10000.0
  c.model.mlp = "gelu"              # gelu (tanh, GPT-2) | gelu_exact (erf, BERT) | swiglu | relu | squared_relu (Primer)
  c.model.parallel_residual = False  # GPT-J/PaLM block: x + attn(norm(x)) + mlp(norm(x)); pre-norm, no cross-attention
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.scale_embeddings = False  # multiply embeddings by sqrt(d_model), as Vaswani et al.
  c.model.num_token_types = 0       # BERT segment embeddings; 0 disables
  c.model.num_classes = 0           # encoder_classifier / decoder_classifier: labels of the task (README "Question answering and classification")
  c.model.embed_norm = False        # BERT: LayerNorm over the summed embeddings
  c.model.dropout_rate = 0.0
  c.model.dtype = "float32"         # compute dtype
  c.model.param_dtype = "float32"   # storage dtype of the master weights
  c.model.scan_layers = False
  c.model.remat_policy = "none"     # none | full | dots | dots_no_batch
  c.model.attention_impl = "xla"    # xla | cudnn (GPU) | splash (TPU Pallas) | triton (GPU Pallas); jaxlm/ops/
  c.model.attention_block_size = 0  # splash/triton query and key tile (multiple of 128 for splash); 0: 512 / 128
  c.model.cpu_kernels = True        # CPU backend, float32: fused attention and norm kernels (jaxlm/ops/cpu_kernels.py)
  c.model.sow_attention_weights = False  # attention on XLA's code, weights sown into 'intermediates' (README)

  c.data = ConfigDict()
  c.data.source = "stdlib"          # stdlib | files | tfds | codesum | prepared | jsonl | squad | stdlib_packages
  c.data.paths = ""                 # comma-separated files or globs for source=files or jsonl (README "Fine-tuning and chat")
  c.data.prepared_dir = ""          # source=prepared: a `jaxlm prepare --out` folder (train/, validation/) (README "Data")
  c.data.mixture = ""               # source=prepared: "[(DIR, WEIGHT), ...]" prepared folders mixed by weight for training
  c.data.validation_paths = ""      # source=files or jsonl: validation files or globs; empty: split data.paths (README "Data")
  c.data.include_tests = False      # stdlib: include the test folders
  c.data.val_fraction = 0.03
  c.data.tokenizer = "byte"         # byte | sentencepiece | huggingface (tokenizer_path: a folder with tokenizer.json)
  c.data.tokenizer_path = ""
  c.data.seq_len = 256
  c.data.shuffle_seed = 0
  c.data.prefetch_threads = 0       # grain read threads; 0 reads in the main thread
  c.data.target_len = 0             # target tokens per row (0: seq_len): encoder_decoder, or a decoder on codesum
  c.data.max_examples = 0           # tfds/codesum: read at most this many examples per split; 0 reads all
  c.data.doc_stride = 128           # squad: a long context is windowed, a new window every doc_stride tokens
  c.data.mlm_probability = 0.15     # encoder: share of tokens chosen for MLM (BERT: 80% [MASK], 10% random, 10% kept)
  c.data.mlm_seed = 0               # MLM masks are a function of (mlm_seed, row index)
  # data.source='tfds': datasets prepared as array_record (docs/datasets.md), read without TensorFlow.
  c.data.tfds_name = ""             # e.g. lm1b, tiny_shakespeare, wmt14_translate/de-en
  c.data.tfds_data_dir = ""         # the prepared data's directory; empty: TFDS's default (~/tensorflow_datasets)
  c.data.tfds_train_split = "train"
  c.data.tfds_eval_split = "validation"  # lm1b has no validation split: use 'test'
  c.data.text_key = "text"          # language modelling: the feature holding the text
  c.data.source_key = ""            # translation: the source language feature, e.g. 'en'
  c.data.target_key = ""            # translation: the target language feature, e.g. 'de'
  c.data.spm_vocab_size = 0         # >0: train a SentencePiece vocabulary of this size at tokenizer_path if missing

  c.train = ConfigDict()
  c.train.global_batch_size = 16
  c.train.num_micro_batches = 1     # gradient accumulation inside the step
  c.train.num_steps = 1000
  c.train.stop_at_step = 0          # stop early, as a preemption would (resume later); 0 runs to num_steps
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.z_loss = 0.0
  c.train.label_smoothing = 0.0
  c.train.compilation_cache_dir = ""  # persistent XLA compilation cache; empty disables
  c.train.init_from = ""            # a new run from this run's parameters (train or convert --from-hf workdir; jaxlm/training/init_from.py)
  c.train.init_from_step = -1       # its checkpoint; -1: the newest (recorded in this run's config.json)

  c.optim = ConfigDict()
  c.optim.name = "adamw"            # adamw | adafactor | lion
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "cosine"       # cosine | linear | rsqrt | constant | transformer
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.1     # cosine/linear decay to this fraction of the peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False
  c.optim.clip_norm = 1.0           # 0 disables

  c.lora = ConfigDict()             # low-rank adapters over a frozen base run (jaxlm/models/lora.py)
  c.lora.rank = 0                   # 0: no adapters (full training); r > 0 trains only rank-r adapters
  c.lora.alpha = 16.0               # the kernel becomes W + (alpha / rank) * A @ B
  c.lora.dropout = 0.0              # drops input features of A, one mask per step (adapters are merged per step)
  c.lora.targets = "query,value"    # comma-separated projections: query, key, value, out, up, gate, down
  c.lora.base_workdir = ""          # the run whose weights stay frozen (train or convert --from-hf workdir)
  c.lora.base_step = -1             # its checkpoint; -1: the latest (recorded in the LoRA run's config.json)

  c.eval = ConfigDict()
  c.eval.batch_size = 16
  c.eval.max_batches = 0            # 0 evaluates the whole validation split
  c.eval.beam_size = 4              # encoder_decoder BLEU: beam search as Vaswani et al. (beam 4, alpha 0.6)
  c.eval.length_penalty = 0.6       # GNMT alpha
  c.eval.max_decode_len = 0         # generated tokens; 0 means data.target_len (or seq_len)
  c.eval.bleu_examples = 0          # validation pairs translated for BLEU; 0: all

  c.mesh = ConfigDict()
  c.mesh.data = -1                  # -1 takes the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = json.dumps(DEFAULT_RULES)  # JSON so it can be overridden on the command line

  c.distributed = ConfigDict()
  c.distributed.coordinator_address = ""  # or env JAX_COORDINATOR_ADDRESS
  c.distributed.num_processes = 0         # or env JAX_NUM_PROCESSES; 0: one process, -1: detect (TPU, SLURM)
  c.distributed.process_id = -1           # or env JAX_PROCESS_ID
  c.distributed.initialization_timeout_s = 300  # how long each process waits for all the others to join
  c.distributed.initialization_attempts = 3     # tries of jax.distributed.initialize (busy hosts fail spuriously)
  c.distributed.heartbeat_timeout_s = 20        # a peer silent this long counts as lost; the others exit (jaxlm/parallel/watchdog.py)
  return c


@dataclasses.dataclass(frozen=True)
class Allowed:
  """The values a config key accepts: numbers in a range (plus special values), a set of choices, or any."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False   # True excludes `low` itself
  high_open: bool = False  # True excludes `high` itself
  also: tuple = ()         # special values outside the range, such as 0 for "off" or -1 for "fill"
  choices: tuple = ()
  note: str = ""           # shown for keys without a numeric range, e.g. "a path or glob"

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
# three). Keys with choices are in _CHOICES below; tests/unit/test_config.py checks that every key is in one of them.
RANGES = {
    "seed": _COUNT,
    "model.vocab_size": _POSITIVE, "model.num_layers": _POSITIVE, "model.num_decoder_layers": _COUNT,
    "model.d_model": _POSITIVE, "model.num_heads": _POSITIVE, "model.num_kv_heads": _COUNT,
    "model.head_dim": _COUNT, "model.mlp_dim": _POSITIVE, "model.max_len": _at_least(1),
    "model.norm_eps": _POSITIVE_REAL, "model.rope_theta": _POSITIVE_REAL, "model.use_bias": _BOOL,
    "model.tie_embeddings": _BOOL, "model.scale_embeddings": _BOOL, "model.num_token_types": _COUNT, "model.num_classes": _COUNT,
    "model.embed_norm": _BOOL, "model.dropout_rate": _BETA, "model.scan_layers": _BOOL, "model.cpu_kernels": _BOOL,
    "model.parallel_residual": _BOOL, "model.sow_attention_weights": _BOOL,
    "model.attention_block_size": _COUNT,
    "data.paths": Allowed(note="comma-separated paths or globs"),
    "data.validation_paths": Allowed(note="comma-separated paths or globs"), "data.include_tests": _BOOL,
    "data.val_fraction": _OPEN_FRACTION, "data.tokenizer_path": Allowed(note="a path"), "data.seq_len": _POSITIVE,
    "data.shuffle_seed": _COUNT, "data.prefetch_threads": _COUNT, "data.target_len": _COUNT,
    "data.max_examples": _COUNT, "data.doc_stride": _POSITIVE, "data.mlm_probability": Allowed(0, 1, low_open=True), "data.mlm_seed": _COUNT,
    "data.tfds_name": _TEXT, "data.tfds_data_dir": Allowed(note="a directory"), "data.tfds_train_split": _TEXT,
    "data.tfds_eval_split": _TEXT, "data.text_key": _TEXT, "data.source_key": _TEXT, "data.target_key": _TEXT,
    "data.spm_vocab_size": _COUNT, "data.prepared_dir": Allowed(note="a directory"),
    "data.mixture": Allowed(note="[(DIR, WEIGHT), ...]"),
    "train.global_batch_size": _POSITIVE, "train.num_micro_batches": _POSITIVE, "train.num_steps": _POSITIVE,
    "train.stop_at_step": _COUNT, "train.log_every": _POSITIVE, "train.eval_every": _POSITIVE,
    "train.eval_batches": _POSITIVE, "train.checkpoint_every": _POSITIVE, "train.keep_checkpoints": _POSITIVE,
    "train.z_loss": _at_least(0), "train.label_smoothing": _BETA,
    "train.compilation_cache_dir": Allowed(note="a directory"),
    "train.init_from": Allowed(note="a run directory"), "train.init_from_step": _at_least(0, -1),
    "optim.learning_rate": _POSITIVE_REAL, "optim.warmup_steps": _COUNT, "optim.end_lr_fraction": _FRACTION,
    "optim.b1": _BETA, "optim.b2": _BETA, "optim.eps": _at_least(0), "optim.weight_decay": _at_least(0),
    "optim.decay_embeddings": _BOOL, "optim.clip_norm": _at_least(0),
    "lora.rank": _COUNT, "lora.alpha": _POSITIVE_REAL, "lora.dropout": _BETA,
    "lora.targets": Allowed(note="comma-separated projection names"),
    "lora.base_workdir": Allowed(note="a run directory"), "lora.base_step": _at_least(0, -1),
    "eval.batch_size": _POSITIVE, "eval.max_batches": _COUNT, "eval.beam_size": _COUNT,
    "eval.length_penalty": _at_least(0), "eval.max_decode_len": _COUNT, "eval.bleu_examples": _COUNT,
    "mesh.data": _at_least(1, -1), "mesh.fsdp": _at_least(1, -1), "mesh.tensor": _at_least(1, -1),
    "mesh.rules": Allowed(note="JSON list of [logical, mesh axes]"),
    "distributed.coordinator_address": Allowed(note="host:port"), "distributed.num_processes": _at_least(0, -1),
    "distributed.process_id": _at_least(0, -1), "distributed.initialization_timeout_s": _POSITIVE,
    "distributed.initialization_attempts": _POSITIVE, "distributed.heartbeat_timeout_s": _at_least(2),
}


def allowed(key: str) -> Allowed:
  """What config key `key` (dotted) accepts (anything, for a key missing from the tables; a test flags those)."""
  if key in _CHOICES:
    return Allowed(choices=_CHOICES[key])
  return RANGES.get(key, Allowed())


def _line_in(file: Path, error: BaseException) -> str:
  """'line N' of the innermost traceback frame inside `file`, or '' if the error arose elsewhere."""
  line = ""
  frame = error.__traceback__
  while frame is not None:
    if Path(frame.tb_frame.f_code.co_filename).resolve() == file.resolve():
      line = f"line {frame.tb_lineno}"
    frame = frame.tb_next
  return line


def load_config_file(path: str) -> ConfigDict:
  """Runs `get_config()` of the Python file `path` and schema-checks the result; ConfigError names the file and line."""
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"--config: file '{path}' not found; pass a path such as configs/default.py")
  if file.suffix != ".py":
    raise ConfigError(f"--config: '{path}' is not a Python file; pass a configs/*.py file defining get_config() "
                      "(a run's saved config.json is read through --workdir by eval, generate and serve)")
  spec = importlib.util.spec_from_file_location(f"jaxlm_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config: {path}, line {e.lineno}: syntax error ({e.msg}); fix the file") from None
  except Exception as e:  # noqa: BLE001 - whatever the file raises is reported with its line
    raise ConfigError(f"--config: {path}, {_line_in(file, e) or 'at import'}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}; fix the file") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: '{path}' has no get_config(); define one returning a ConfigDict")
  try:
    config = module.get_config()
  except Exception as e:  # noqa: BLE001
    where = _line_in(file, e) or "in get_config()"
    raise ConfigError(f"--config: {path}, {where}: get_config() raised {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}; fix the file") from None
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"--config: get_config() in {path} returned {type(config).__name__}, not a ConfigDict; "
                      "start from jaxlm.config.base_config()")
  check_schema(config)
  return config


def unknown_key_message(key: str) -> str:
  """One line for a key the schema lacks, with the closest schema keys as suggestions."""
  names = [name for name, _ in _leaves(base_config())]
  close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
  if not close:  # a right leaf under a wrong section, e.g. 'train.learning_rate'
    close = [name for name in names if name.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
  hint = f"did you mean `{close[0]}`?" if close else "`jaxlm config show CONFIG` lists every key"
  return f"config key '{key}' is unknown; {hint}"


def _leaves(config: ConfigDict, prefix: str = ""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ConfigDict):
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def _get(config: ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ConfigDict) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _type_ok(expected, value) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(expected, bool) and isinstance(value, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(expected))


def check_schema(config: ConfigDict) -> None:
  """Every key exists in the base schema and has its type."""
  base = base_config()
  for name, value in _leaves(config):
    try:
      expected = _get(base, name)
    except KeyError:
      raise ConfigError(unknown_key_message(name)) from None
    if not _type_ok(expected, value):
      raise ConfigError(f"config key '{name}' must be {type(expected).__name__}, got {value!r}; fix the value")


_NON_FINITE = ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "-infinity")


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `--config.a.b=value` arguments to `config` (the whole config) and returns it; values parse as
  Python literals. (`jaxlm train` then checks model overrides against a `train.init_from` run: init_from.py.)"""
  base = base_config()
  for arg in overrides:
    if "=" not in arg:
      raise ConfigError(f"override '{arg}' has no value; write it as {arg}=VALUE (with '=', not a space)")
    key, text = arg[len("--config."):].split("=", 1)
    try:
      expected = _get(base, key)
    except KeyError:
      raise ConfigError(unknown_key_message(key)) from None
    if isinstance(expected, str):
      value = text
    else:
      try:
        # float() first: it reads nan and inf, which literal_eval cannot, so validation can name them.
        value = float(text) if isinstance(expected, float) and text.strip().lower() in _NON_FINITE else ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise ConfigError(f"config key '{key}' must be {type(expected).__name__}, got '{text}'; fix the value") from None
    if not _type_ok(expected, value):
      raise ConfigError(f"config key '{key}' must be {type(expected).__name__}, got '{text}'; fix the value")
    parent, _, leaf = key.rpartition(".")
    node = _get(config, parent) if parent else config
    with node.ignore_type():
      node[leaf] = type(expected)(value)
  return config


def head_dim(model: ConfigDict) -> int:
  """The per-head width of the model sub-config: `head_dim`, or d_model / num_heads when 0."""
  return model.head_dim or model.d_model // model.num_heads


def num_kv_heads(model: ConfigDict) -> int:
  """Key/value heads of the model sub-config: `num_kv_heads`, or num_heads (multi-head) when 0."""
  return model.num_kv_heads or model.num_heads


def model_of_run(model_cfg: ConfigDict, run_model_cfg: ConfigDict, log, who: str, run_dir,
                 keep: tuple[str, ...] = ()) -> ConfigDict:
  """The model section of a run built on the weights of the saved run in `run_dir` (LoRA's base,
  `train.init_from`): that run's `run_model_cfg`, except the keys in `keep`, which stay `model_cfg`'s. The saved
  weights fix the other keys, so where `model_cfg` differs there it is ignored, and `log` gets one line that
  names those keys, starting with `who` (e.g. 'lora')."""
  model = run_model_cfg.copy_and_resolve_references()
  for key in keep:
    model[key] = model_cfg[key]
  ignored = sorted(key for key, value in run_model_cfg.items() if key not in keep and model_cfg.get(key) != value)
  if ignored:
    log(f"{who}: the model is {run_dir}'s (this config differed in model.{', model.'.join(ignored)})")
  return model


def mesh_rules(config: ConfigDict) -> tuple:
  """The whole config's `mesh.rules` (JSON) as ((logical name, mesh axes), ...); raises ConfigError."""
  try:
    rules = json.loads(config.mesh.rules)
  except json.JSONDecodeError as e:
    raise ConfigError(f"config key 'mesh.rules' is not valid JSON ({e.msg}); write a list of [logical, mesh_axes] pairs") from None
  try:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  except (TypeError, ValueError):
    raise ConfigError("config key 'mesh.rules' is not a list of [logical, mesh_axes] pairs; "
                      'write e.g. [["batch", ["data", "fsdp"]], ["embed", "fsdp"]]') from None


_CHOICES = {
    "model.family": ("decoder", "encoder_decoder", "encoder", "encoder_qa", "encoder_classifier",
                     "decoder_classifier"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.position": ("learned", "rope", "sinusoidal"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu", "relu", "squared_relu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("none", "full", "dots", "dots_no_batch"),
    "model.attention_impl": ("xla", "cudnn", "splash", "triton"),
    "data.source": ("stdlib", "files", "tfds", "codesum", "prepared", "jsonl", "squad", "stdlib_packages"),
    "data.tokenizer": ("byte", "sentencepiece", "huggingface"),
    "optim.name": ("adamw", "adafactor", "lion"),
    "optim.schedule": ("cosine", "linear", "rsqrt", "constant", "transformer"),
}


def validate(config: ConfigDict, num_devices: int) -> None:
  """Checks everything that can be checked before compiling; raises ConfigError."""
  check_schema(config)
  for key, value in _leaves(config):
    rule = allowed(key)
    if not rule.accepts(value):
      if rule.choices:
        raise ConfigError(f"config key '{key}' is '{value}'; choose one of {', '.join(rule.choices)}")
      finite = "" if isinstance(value, str) or math.isfinite(value) else "a finite number, "
      raise ConfigError(f"config key '{key}' is {value}; it must be {finite}{rule.describe()}")
  m = config.model
  for key in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_len", "vocab_size"):
    if m[key] <= 0:
      raise ConfigError(f"config key 'model.{key}' must be positive, got {m[key]}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
                      "change one of them or set model.head_dim")
  if m.num_heads % num_kv_heads(m):
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
                      "choose num_kv_heads dividing num_heads")
  if m.position == "rope" and head_dim(m) % 2:
    raise ConfigError(f"RoPE needs an even head dimension, got {head_dim(m)}; change model.head_dim or model.num_heads")
  if m.parallel_residual and (m.norm_position != "pre" or m.family == "encoder_decoder"):
    raise ConfigError("model.parallel_residual=True needs model.norm_position='pre' and no cross-attention "
                      f"(model.family decoder or encoder), got '{m.norm_position}' and '{m.family}'")
  if config.data.seq_len > m.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={m.max_len}; "
                      "lower data.seq_len or raise model.max_len")
  if config.data.source in ("files", "jsonl") and not config.data.paths:
    raise ConfigError(f"data.paths is empty but data.source='{config.data.source}'; "
                      "pass --config.data.paths=PATH_OR_GLOB")
  if config.data.source == "jsonl" and m.family != "decoder":
    raise ConfigError(f"data.source='jsonl' (prompt/completion and chat records) feeds the decoder family, not "
                      f"model.family='{m.family}'")
  if config.data.tokenizer == "huggingface" and not _path(config.data.tokenizer_path or ".").joinpath(
      "tokenizer.json").is_file():
    raise ConfigError(f"data.tokenizer_path: '{config.data.tokenizer_path}' holds no tokenizer.json; pass a Hugging "
                      "Face tokenizer folder (save_pretrained) or a converted run's hf_tokenizer/ folder")
  if config.data.source == "files":  # jsonl paths are globbed when read (jaxlm/data/instruct.py), same message
    from jaxlm.data import corpus  # local: keeps config importable without the data stack
    try:
      corpus.glob_files(config.data.paths.split(","))
    except FileNotFoundError as e:
      raise ConfigError(f"data.paths: no file matches '{e.args[0]}'; fix the path or glob") from None
    if config.data.validation_paths:
      try:
        corpus.glob_files(config.data.validation_paths.split(","))
      except FileNotFoundError as e:
        raise ConfigError(f"data.validation_paths: no file matches '{e.args[0]}'; fix the path or glob") from None
  if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path:
    raise ConfigError("data.tokenizer_path is empty but data.tokenizer='sentencepiece'; pass an existing .model file, "
                      "or a path to create together with --config.data.spm_vocab_size=N")
  if config.data.target_len > m.max_len:
    raise ConfigError(f"data.target_len={config.data.target_len} exceeds model.max_len={m.max_len}; "
                      "lower data.target_len or raise model.max_len")
  if config.data.source == "tfds":
    _validate_tfds(config)
  if config.data.source == "prepared" and not (config.data.prepared_dir or config.data.mixture):
    raise ConfigError("data.source='prepared' needs --config.data.prepared_dir=DIR (from `jaxlm prepare --out DIR`) "
                      "or --config.data.mixture='[(DIR, WEIGHT), ...]'")
  if config.data.source == "prepared" and m.family != "decoder":
    raise ConfigError(f"data.source='prepared' feeds the decoder family, not model.family='{m.family}'")
  if config.data.source == "codesum" and m.family not in ("encoder_decoder", "decoder"):
    raise ConfigError(f"data.source='codesum' pairs code with summaries, which needs model.family='encoder_decoder' "
                      f"or 'decoder' (prompt -> completion), not '{m.family}'")
  if config.data.source == "codesum" and m.family == "decoder" and config.data.target_len < 2:
    raise ConfigError(f"data.target_len={config.data.target_len}: a decoder on data.source='codesum' keeps the last "
                      "data.target_len tokens of each row for the summary; set it, e.g. --config.data.target_len=80")
  if (config.data.tokenizer == "sentencepiece" and not config.data.spm_vocab_size
      and not _path(config.data.tokenizer_path).is_file()):
    raise ConfigError(f"data.tokenizer_path: '{config.data.tokenizer_path}' not found; pass an existing .model file")

  mesh_shape(config, num_devices)  # raises on a bad mesh
  for logical, axes in mesh_rules(config):
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in ("data", "fsdp", "tensor"):
        raise ConfigError(f"config key 'mesh.rules' maps '{logical}' to mesh axis '{axis}', which does not exist; "
                          "use data, fsdp, tensor or null")
  t = config.train
  dp = data_parallel_size(config, num_devices)
  if t.global_batch_size % (dp * t.num_micro_batches):
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by data-parallel size {dp} "
                      f"x train.num_micro_batches={t.num_micro_batches}; use a multiple of {dp * t.num_micro_batches}")
  if config.eval.batch_size % dp:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} is not divisible by data-parallel size {dp}; "
                      f"use a multiple of {dp}")
  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_micro_batches"):
    if t[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be positive, got {t[key]}")


def _path(location: str):
  """`location` as an `epath.Path`: a local path or a gs:// URL (see jaxlm/storage/fs.py)."""
  from jaxlm.storage import fs  # local: keeps config importable without etils
  return fs.path(location)


def _validate_tfds(config: ConfigDict) -> None:
  d = config.data
  if not d.tfds_name:
    raise ConfigError("data.tfds_name is empty but data.source='tfds'; pass e.g. --config.data.tfds_name=lm1b")
  if d.tfds_data_dir and not _path(d.tfds_data_dir).is_dir():
    raise ConfigError(f"data.tfds_data_dir '{d.tfds_data_dir}' does not exist; prepare the data with "
                      f"`tfds build {d.tfds_name} --file_format=array_record --data_dir=DIR` (docs/datasets.md)")
  if config.model.family == "encoder_decoder" and not (d.source_key and d.target_key):
    raise ConfigError("data.source_key/data.target_key are empty; a translation dataset needs both, "
                      "e.g. --config.data.source_key=en --config.data.target_key=de")


def mesh_shape(config: ConfigDict, num_devices: int) -> dict[str, int]:
  """{'data': d, 'fsdp': f, 'tensor': t} whose product is the device count."""
  sizes = {axis: config.mesh[axis] for axis in ("data", "fsdp", "tensor")}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(f"mesh {sizes} is invalid; give positive sizes, with at most one axis set to -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {sizes} cannot fill {num_devices} devices; make the fixed axes divide {num_devices}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present; "
                      f"set --config.mesh.data=-1 or make the product {num_devices}")
  return sizes


def data_parallel_size(config: ConfigDict, num_devices: int) -> int:
  """Ways the whole config's batch is split over `num_devices`: mesh data x fsdp."""
  sizes = mesh_shape(config, num_devices)
  return sizes["data"] * sizes["fsdp"]
