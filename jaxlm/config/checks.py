"""Checking a whole config before anything compiles, and the values derived from it: head sizes, the mesh and
its sharding rules, and the model section of a run built on another run's weights.

The checks of one family or one data source live with it (`Family.check`, `Source.check`); `validate` runs
them with its own.
"""

from __future__ import annotations

import json
import math

from jaxlm.config.files import check_schema
from jaxlm.config.schema import ConfigDict, allowed, leaves
from jaxlm.errors import ConfigError


def head_dim(model: ConfigDict) -> int:
  """The per-head width of the model sub-config: `head_dim`, or d_model / num_heads when 0."""
  return model.head_dim or model.d_model // model.num_heads


def num_kv_heads(model: ConfigDict) -> int:
  """Key/value heads of the model sub-config: `num_kv_heads`, or num_heads (multi-head) when 0."""
  return model.num_kv_heads or model.num_heads


def model_of_run(
  model_cfg: ConfigDict, run_model_cfg: ConfigDict, log, who: str, run_dir, keep: tuple[str, ...] = ()
) -> ConfigDict:
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
    raise ConfigError(
      f"config key 'mesh.rules' is not valid JSON ({e.msg}); write a list of [logical, mesh_axes] pairs"
    ) from None
  try:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  except (TypeError, ValueError):
    raise ConfigError(
      "config key 'mesh.rules' is not a list of [logical, mesh_axes] pairs; "
      'write e.g. [["batch", ["data", "fsdp"]], ["embed", "fsdp"]]'
    ) from None


def validate(config: ConfigDict, num_devices: int) -> None:
  """Checks everything that can be checked before compiling.

  Args:
    config: the whole config.
    num_devices: the devices the run's mesh spans.

  Raises:
    ConfigError: one line naming the first key at fault and the fix.
  """
  from jaxlm import families  # local: low registries, which find their entries at first use
  from jaxlm.data import sources

  check_schema(config)
  for key, value in leaves(config):
    rule = allowed(key)
    if not rule.accepts(value):
      if rule.choices:
        raise ConfigError(f"config key '{key}' is '{value}'; choose one of {', '.join(rule.choices)}")
      finite = "" if isinstance(value, str) or math.isfinite(value) else "a finite number, "
      raise ConfigError(f"config key '{key}' is {value}; it must be {finite}{rule.describe()}")
  m = config.model
  family = families.get(m.family)
  for key in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_len", "vocab_size"):
    if m[key] <= 0:
      raise ConfigError(f"config key 'model.{key}' must be positive, got {m[key]}")
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(
      f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
      "change one of them or set model.head_dim"
    )
  if m.num_heads % num_kv_heads(m):
    raise ConfigError(
      f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}; "
      "choose num_kv_heads dividing num_heads"
    )
  if m.position == "rope" and head_dim(m) % 2:
    raise ConfigError(f"RoPE needs an even head dimension, got {head_dim(m)}; change model.head_dim or model.num_heads")
  if m.parallel_residual and (m.norm_position != "pre" or family.attention_layers(m)[1]):
    raise ConfigError(
      "model.parallel_residual=True needs model.norm_position='pre' and no cross-attention "
      f"(model.family decoder or encoder), got '{m.norm_position}' and '{m.family}'"
    )
  if config.data.seq_len > m.max_len:
    raise ConfigError(
      f"data.seq_len={config.data.seq_len} exceeds model.max_len={m.max_len}; lower data.seq_len or raise model.max_len"
    )
  sources.check(config)
  if (
    config.data.tokenizer == "huggingface"
    and not _path(config.data.tokenizer_path or ".").joinpath("tokenizer.json").is_file()
  ):
    raise ConfigError(
      f"data.tokenizer_path: '{config.data.tokenizer_path}' holds no tokenizer.json; pass a Hugging "
      "Face tokenizer folder (save_pretrained) or a converted run's hf_tokenizer/ folder"
    )
  if config.data.tokenizer == "sentencepiece" and not config.data.tokenizer_path:
    raise ConfigError(
      "data.tokenizer_path is empty but data.tokenizer='sentencepiece'; pass an existing .model file, "
      "or a path to create together with --config.data.spm_vocab_size=N"
    )
  if config.data.target_len > m.max_len:
    raise ConfigError(
      f"data.target_len={config.data.target_len} exceeds model.max_len={m.max_len}; "
      "lower data.target_len or raise model.max_len"
    )
  if family.check is not None:
    family.check(config)
  if (
    config.data.tokenizer == "sentencepiece"
    and not config.data.spm_vocab_size
    and not _path(config.data.tokenizer_path).is_file()
  ):
    raise ConfigError(f"data.tokenizer_path: '{config.data.tokenizer_path}' not found; pass an existing .model file")

  mesh_shape(config, num_devices)  # raises on a bad mesh
  for logical, axes in mesh_rules(config):
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(
          f"config key 'mesh.rules' maps '{logical}' to mesh axis '{axis}', which does not exist; "
          "use data, fsdp, expert, tensor or null"
        )
  _check_moe(config, num_devices)
  t = config.train
  dp = data_parallel_size(config, num_devices)
  if t.global_batch_size % (dp * t.num_micro_batches):
    raise ConfigError(
      f"train.global_batch_size={t.global_batch_size} is not divisible by data-parallel size {dp} "
      f"x train.num_micro_batches={t.num_micro_batches}; use a multiple of {dp * t.num_micro_batches}"
    )
  if config.eval.batch_size % dp:
    raise ConfigError(
      f"eval.batch_size={config.eval.batch_size} is not divisible by data-parallel size {dp}; use a multiple of {dp}"
    )
  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_micro_batches"):
    if t[key] <= 0:
      raise ConfigError(f"config key 'train.{key}' must be positive, got {t[key]}")


def _path(location: str):
  """`location` as an `epath.Path`: a local path or a gs:// URL (see jaxlm/storage/fs.py)."""
  from jaxlm.storage import fs  # local: keeps config importable without etils

  return fs.path(location)


def _check_moe(config: ConfigDict, num_devices: int) -> None:
  """The mixture-of-experts keys (docs/moe.md) against each other, the MLP and the mesh."""
  m = config.model
  if not m.get("moe_experts", 0):
    return
  if m.moe_top_k > m.moe_experts:
    raise ConfigError(
      f"model.moe_top_k={m.moe_top_k} exceeds model.moe_experts={m.moe_experts}; choose top_k <= experts"
    )
  if m.mlp != "swiglu":
    raise ConfigError(f"model.moe_experts>0 needs model.mlp='swiglu' (experts are SwiGLU, as Mixtral's), got '{m.mlp}'")
  if m.moe_every > 1 and m.scan_layers:
    raise ConfigError(
      f"model.moe_every={m.moe_every} mixes MoE and dense layers, which model.scan_layers=True cannot scan; "
      "set --config.model.scan_layers=False or model.moe_every=1"
    )
  expert = mesh_shape(config, num_devices)["expert"]
  if m.moe_experts % expert:
    raise ConfigError(
      f"model.moe_experts={m.moe_experts} is not divisible by mesh.expert={expert}; choose mesh.expert dividing it"
    )


# The mesh's axes, in its device order (jaxlm.parallel.mesh lays the devices out in this order).
MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(config: ConfigDict, num_devices: int) -> dict[str, int]:
  """{'data': d, 'fsdp': f, 'expert': e, 'tensor': t} whose product is the device count (a config saved before
  mesh.expert existed has expert 1)."""
  sizes = {axis: config.mesh.get(axis, 1) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(f"mesh {sizes} is invalid; give positive sizes, with at most one axis set to -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {sizes} cannot fill {num_devices} devices; make the fixed axes divide {num_devices}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
      f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present; "
      f"set --config.mesh.data=-1 or make the product {num_devices}"
    )
  return sizes


def data_parallel_size(config: ConfigDict, num_devices: int) -> int:
  """Ways the whole config's batch is split over `num_devices`: mesh data x fsdp x expert (expert-parallel
  devices split the rows too, and exchange tokens in the MoE layers)."""
  sizes = mesh_shape(config, num_devices)
  return sizes["data"] * sizes["fsdp"] * sizes["expert"]
