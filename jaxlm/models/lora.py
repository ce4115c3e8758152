"""Low-rank adapters (LoRA, Hu et al. 2021) over a frozen base run.

A LoRA run trains only the adapters: for each targeted projection kernel W
(logical axes inputs first, e.g. query (embed, heads, head_dim)) a pair
A: in x r and B: r x out, so the kernel becomes W + (alpha / r) * A @ B.
B starts at zero, so a fresh adapter leaves the model unchanged.

How it fits the trainer: `AdaptedModel` is an ordinary Flax module whose
only parameters are the adapters; the base parameters are a field of the
module (closed over by the jitted step, which JAX passes as arguments, not
constants). The `TrainState` therefore holds adapters alone, so the optimizer
state exists only for them, and every checkpoint of a LoRA run is an adapter
checkpoint. The run's config.json names the base (`lora.base_workdir`,
`lora.base_step`) and records its identity (`lora.base_checksum`, a digest of
the checksums that base checkpoint recorded for its parameters), which is
checked each time the base is read: adapters trained over one run are never
merged into another that took its folder, however alike their shapes. `jaxlm.load`
merges the two, so eval, generate, serve, export, quantize and convert --to-hf
see plain merged parameters. The adapters alone:

    config = jaxlm.loader.load_config(RUN)
    mesh = jaxlm.loader.single_device_mesh()
    module = lora.adapted_model(config, lora.base_params(config, mesh))
    adapters, step = jaxlm.loader.restore_params(RUN, config, jaxlm.loader.param_shardings(config, mesh, module),
                                                 None, module)

From Python, without a base run directory (`apply_lora`, `merge_lora`; exported as `jaxlm.apply_lora`,
`jaxlm.merge_lora`):

    model, adapters = lora.apply_lora(config, base_params, rank=8)  # an ordinary module to train
    jaxlm.train(config, RUN, model=model, train_data=...)           # config.lora.rank stays 0
    params = lora.merge_lora(model, jaxlm.load(RUN, model=model).params)  # the base's tree, adapted

Each step merges the adapters into the targeted kernels (one matmul per
projection, as the base model's) instead of adding a second path per token.
For that reason `lora.dropout` cannot drop per token as in the paper: it
drops input features of A (rows), one mask per step shared by the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.config import Config
from jaxlm.models import transformer as model_lib
from jaxlm.parallel import sharding
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs, run_dir

SEPARATOR = "."  # adapter parameter names are the kernel's module path joined by this


def enabled(config: Config) -> bool:
  """True when the whole `config` trains (or a saved run holds) adapters: `lora.rank` > 0."""
  return "lora" in config and config.lora.rank > 0


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def target_kernels(boxed_params, targets: str) -> dict[tuple[str, ...], tuple[int, int]]:
  """{module path: (leading layer axes, input axes)} of the kernels `targets` names.

  boxed_params: the base's parameter tree with logical names (`nn.Partitioned` leaves, as `model.init`
  gives; shapes suffice). targets: comma-separated module names, e.g. 'query,value'. A kernel's input axes are
  its first non-layer axis when that is 'embed' (query, key, value, up, gate), else all but its last
  (out, down). Raises ConfigError for a name that matches no kernel.
  """
  wanted = [name.strip() for name in targets.split(",") if name.strip()]
  found, available = {}, set()
  leaves = jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    names = _names(path)
    if names[-1] != "kernel" or not isinstance(leaf, nn.Partitioned):
      continue
    available.add(names[-2])
    if names[-2] not in wanted:
      continue
    axes = leaf.names
    lead = len(axes) - len(axes[next(i for i, a in enumerate(axes) if a != "layers") :])
    num_in = 1 if axes[lead] == "embed" else len(axes) - lead - 1
    found[names[:-1]] = (lead, num_in)
  missing = [name for name in wanted if name not in available]
  if missing or not wanted:
    raise config_lib.ConfigError(
      f"config key 'lora.targets' is '{targets}': {', '.join(missing) or 'empty'} names no projection of this "
      f"model; choose from {', '.join(sorted(available))}"
    )
  return found


def _shapes(kernel_shape: tuple[int, ...], lead: int, num_in: int, rank: int):
  layer_shape = kernel_shape[:lead]
  size_in = math.prod(kernel_shape[lead : lead + num_in])
  size_out = math.prod(kernel_shape[lead + num_in :])
  return layer_shape + (size_in, rank), layer_shape + (rank, size_out)


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def merge(base_params, adapters, targets: dict, scale: float):
  """The base parameter tree with each targeted kernel replaced by W + scale * A @ B (same shapes and dtypes).

  base_params: the base model's (unboxed) parameters. adapters: {'PATH.lora_a': A, 'PATH.lora_b': B} as
  `AdaptedModel` makes them. targets: `target_kernels`' result. scale: alpha / rank.
  """

  def visit(node, path):
    if not isinstance(node, Mapping):  # flax freezes a module field's dict into a FrozenDict
      return node
    if path in targets:
      key = SEPARATOR.join(path)
      kernel = node["kernel"]
      a, b = adapters[f"{key}.lora_a"], adapters[f"{key}.lora_b"]
      delta_flat = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
      delta = delta_flat.reshape(kernel.shape) * scale
      node = {**node, "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
    return {name: visit(child, path + (name,)) for name, child in node.items()}

  return visit(base_params, ())


class AdaptedModel(nn.Module):
  """A family model whose parameters are LoRA adapters over fixed `base_params`.

  cfg: the model sub-config (the base run's `config.model`). lora_cfg: the `config.lora` section.
  base_params: the base model's unboxed parameter tree (arrays, or shapes for `jax.eval_shape`).
  Called like the family model (it takes the same inputs); its params are {'PATH.lora_a', 'PATH.lora_b'}.
  """

  cfg: ml_collections.ConfigDict
  lora_cfg: ml_collections.ConfigDict
  base_params: Any
  targets: Any  # `target_kernels`' result, as a tuple of (path, (lead, num_in)) so the module stays hashable
  deterministic: bool = True

  @nn.compact
  def __call__(self, *args, **kwargs):
    rank = self.lora_cfg.rank
    adapters = {}
    for path, (lead, num_in) in self.targets:
      kernel = _get(self.base_params, path)["kernel"]
      a_shape, b_shape = _shapes(kernel.shape, lead, num_in, rank)
      key = SEPARATOR.join(path)
      # A like the base kernels (variance 1 / fan-in); B zero, so training starts from the base model.
      a = self.param(f"{key}.lora_a", nn.initializers.normal(a_shape[-2] ** -0.5), a_shape, jnp.float32)
      b = self.param(f"{key}.lora_b", nn.initializers.zeros, b_shape, jnp.float32)
      if self.lora_cfg.dropout and not self.deterministic:
        keep = 1.0 - self.lora_cfg.dropout
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, a_shape[:-1] + (1,))
        a = jnp.where(mask, a / keep, 0.0)
      adapters[f"{key}.lora_a"], adapters[f"{key}.lora_b"] = a, b
    merged = merge(self.base_params, adapters, dict(self.targets), self.lora_cfg.alpha / rank)
    base_model = model_lib.build(self.cfg, deterministic=self.deterministic).clone(parent=None)
    rngs = {} if self.deterministic else {"dropout": self.make_rng("dropout")}
    return base_model.apply({"params": merged}, *args, rngs=rngs, **kwargs)


def _boxed_params(model_cfg):
  """The model's parameter shapes with their logical names (`nn.Partitioned`); nothing is allocated."""
  base_model = model_lib.build(model_cfg)
  batch = model_lib.example_batch(model_cfg, (1, 8))
  return jax.eval_shape(
    lambda: base_model.init(jax.random.key(0), **families.model_inputs(base_model, batch))["params"]
  )


def targets_of(config: Config) -> dict[tuple[str, ...], tuple[int, int]]:
  """`target_kernels` of the model the whole `config` describes, for its `lora.targets` (shapes only)."""
  return target_kernels(_boxed_params(config.model), config.lora.targets)


def adapted_model(config: Config, base_params, deterministic: bool = False) -> AdaptedModel:
  """The `AdaptedModel` of the whole `config` (its `model` and `lora` sections) over `base_params`."""
  targets = tuple(sorted(targets_of(config).items()))
  return AdaptedModel(config.model, config.lora, base_params, targets, deterministic)


def apply_lora(
  config,
  base_params,
  rank: int = 8,
  alpha: float = 16.0,
  targets: str = "query,value",
  dropout: float = 0.0,
  deterministic: bool = False,
) -> tuple[AdaptedModel, Any]:
  """LoRA adapters over in-memory base parameters: a module that trains only them, and fresh adapters.

  Train the module like any other (`jaxlm.train(config, workdir, model=model, ...)`, with `config.lora.rank`
  left at 0: the module carries the adapters); `merge_lora` folds trained adapters into the base.

  Args:
    config: the whole config or its `model` section, describing the base model (a built-in family's).
    base_params: the base model's parameters (plain or boxed arrays, e.g. `jaxlm.init`'s or `jaxlm.load`'s).
    rank: the adapters' rank r (> 0).
    alpha: the scale numerator: each targeted kernel W becomes W + (alpha / rank) * A @ B.
    targets: comma-separated projection names (query, key, value, out, up, gate, down).
    dropout: the fraction of A's input features dropped per step in training.
    deterministic: True turns dropout (the base model's and the adapters') off; the trainer evaluates with
      it on and off as it does for any model.

  Returns:
    (model, adapters): the `AdaptedModel` and its initial adapter parameters ({'PATH.lora_a', 'PATH.lora_b'};
    B is zero, so the adapted model starts equal to the base).

  Raises:
    ConfigError: rank < 1, or a target that names no projection of the model.
  """
  model_cfg = config.model if "model" in config else config
  if rank < 1:
    raise config_lib.ConfigError(f"apply_lora: rank is {rank}; pass rank >= 1 (e.g. 8)")
  lora_cfg = ml_collections.ConfigDict(dict(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=targets))
  found = tuple(sorted(target_kernels(_boxed_params(model_cfg), targets).items()))
  model = AdaptedModel(model_cfg, lora_cfg, nn.meta.unbox(base_params), found, deterministic)
  batch = model_lib.example_batch(model_cfg, (1, 8))
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  adapters = jax.jit(lambda: model.init(rngs, **families.model_inputs(model, batch))["params"])()
  return model, adapters


def on_mesh(model: AdaptedModel, mesh: Mesh, rules) -> AdaptedModel:
  """`model` with its base parameters placed on `mesh` by the logical `rules` (where the trainer runs it).

  Args:
    model: an `AdaptedModel` whose base parameters may sit anywhere (one device, another mesh).
    mesh: the run's mesh.
    rules: the run's logical axis rules (`config_lib.mesh_rules(config)`).

  Returns:
    A clone of `model` whose base parameters are sharded on `mesh`.
  """
  shardings = sharding.logical_shardings(mesh, rules, _boxed_params(model.cfg))
  base = flax.core.unfreeze(model.base_params)  # Flax froze the field's dict; the shardings' tree is plain
  return model.clone(base_params=jax.device_put(base, shardings))


def merge_lora(model: AdaptedModel, adapters) -> Any:
  """The base parameters of `model` (an `apply_lora` module) with `adapters` merged in.

  Args:
    model: the `AdaptedModel`, which holds the base parameters and the LoRA settings.
    adapters: its (trained) adapter parameters, e.g. `jaxlm.load(RUN, model=model).params`.

  Returns:
    A parameter tree of the base model's structure, shapes and dtypes, for `jaxlm.build_model(config.model)`
    and `jaxlm.save`.
  """
  scale = model.lora_cfg.alpha / model.lora_cfg.rank
  # The adapters may sit on the trainer's mesh and the base on one device (`jaxlm.load`); jit takes no arguments
  # across device sets, so the adapters (low-rank, small) come to the host and follow the base parameters.
  adapters = jax.device_get(adapters)
  return jax.jit(lambda base, a: merge(base, a, dict(model.targets), scale))(model.base_params, adapters)


def _check_base(config: Config) -> None:
  if not config.lora.base_workdir:
    raise config_lib.ConfigError(
      "lora.rank > 0 needs the run to adapt: pass --config.lora.base_workdir=RUN "
      "(a `jaxlm train` or `jaxlm convert --from-hf` work directory)"
    )


def _read_base(base_dir: Path) -> tuple[Config, checkpoint_lib.Checkpointer]:
  """The base run's saved config and a read-only Checkpointer of it."""
  try:
    base_config = run_dir.read_config(base_dir)
  except (ValueError, AttributeError, TypeError) as e:  # not JSON, or JSON that is not an object (ConfigDict)
    raise config_lib.ConfigError(
      f"lora.base_workdir: {run_dir.config_path(base_dir)} is not a readable config ({e}); restore that run's "
      "config.json"
    ) from None
  if base_config is None:
    raise config_lib.ConfigError(
      f"lora.base_workdir: {run_dir.config_path(base_dir)} not found; pass the --workdir "
      "of a `jaxlm train` or `jaxlm convert --from-hf` run"
    )
  config_lib.check_schema(base_config)
  if enabled(base_config):
    raise config_lib.ConfigError(
      f"lora.base_workdir: {base_dir} is itself a LoRA run; adapt its base ({base_config.lora.base_workdir}) instead"
    )
  return base_config, checkpoint_lib.Checkpointer(run_dir.checkpoints_path(base_dir), read_only=True)


def _digest(checkpointer: checkpoint_lib.Checkpointer, step: int) -> str:
  records = (checkpointer.read_meta(step) or {}).get("integrity", {}).get("arrays", {})
  params = sorted((name, record["checksum"]) for name, record in records.items() if name.startswith("params/"))
  return hashlib.sha256(json.dumps(params).encode()).hexdigest()[:32] if params else ""


def base_checksum(base_dir, step: int) -> str:
  """The identity of a base checkpoint: a digest of the checksums its integrity records hold for the parameter
  arrays (`jaxlm.storage.integrity`), so any other weights give another digest.

  Args:
    base_dir: the base run's work directory, local or gs://.
    step: the checkpoint.

  Returns:
    32 hex digits; '' for a checkpoint saved before checksums were recorded.
  """
  checkpointer = checkpoint_lib.Checkpointer(run_dir.checkpoints_path(base_dir), read_only=True)
  try:
    return _digest(checkpointer, step)
  finally:
    checkpointer.close()


def check_base(config: Config) -> None:
  """Checks that the base a LoRA run names is the one its adapters were trained over.

  Args:
    config: the LoRA run's whole config: `lora.base_workdir`, `lora.base_step` and `lora.base_checksum` (a
      config without the record, from a run older than it or over a base saved without checksums, checks nothing).

  Raises:
    ConfigError: one line naming the base, when that step is gone or its parameters' checksums differ.
  """
  recorded = config.lora.get("base_checksum", "")
  if not recorded:
    return
  base_dir, step = fs.path(config.lora.base_workdir), config.lora.base_step
  checkpointer = checkpoint_lib.Checkpointer(run_dir.checkpoints_path(base_dir), read_only=True)
  try:
    steps = checkpointer.all_steps()
    found = _digest(checkpointer, step) if step in steps else None
  finally:
    checkpointer.close()
  if found is None:
    raise config_lib.ConfigError(
      f"lora.base_workdir: {base_dir} has no checkpoint step {step}, the base these adapters were trained over "
      f"(its steps: {', '.join(map(str, steps)) or 'none'}); the base run was replaced or pruned: restore it"
    )
  if found != recorded:
    raise config_lib.ConfigError(
      f"lora.base_workdir: {base_dir} step {step} is not the base these adapters were trained over: its "
      f"parameters changed (checksum digest {found or 'absent'}, recorded {recorded}); restore that base run, "
      "or train new adapters over this one"
    )


def resolve_base(config: Config, log=print, workdir=None) -> Config:
  """A copy of the whole `config` bound to its base run: `lora.base_workdir` absolute, `lora.base_step` the
  checkpoint read (when -1: the one `workdir`'s config.json recorded, so a resumed run keeps its base; else the
  latest), `lora.base_checksum` that checkpoint's identity (`base_checksum`; a resumed run keeps the one it
  recorded, and `check_base` then compares them), and `model` the base run's model section (adapters only fit
  the base's shapes; `log` says so when the config's differed). Raises ConfigError."""
  _check_base(config)
  base_dir = fs.absolute(config.lora.base_workdir)  # a gs:// URL stays one
  base_config, checkpointer = _read_base(base_dir)
  step = config.lora.base_step
  saved = run_dir.read_config(workdir) if workdir is not None else None
  recorded = saved.get("lora", {}) if saved is not None else {}
  resumed = recorded.get("base_workdir") == str(base_dir) and (step < 0 or step == recorded.get("base_step"))
  if resumed:
    step = recorded.get("base_step", -1)
  try:
    step = checkpointer.latest_step() if step < 0 else step
  finally:
    checkpointer.close()
  if step is None:
    raise config_lib.ConfigError(
      f"lora.base_workdir: no complete checkpoint in {base_dir / 'checkpoints'}; train the base run first"
    )
  config = config.copy_and_resolve_references()
  config.model = config_lib.model_of_run(config.model, base_config.model, log, "lora", base_dir)
  config.lora.base_workdir, config.lora.base_step = str(base_dir), step
  if not config.lora.base_checksum:  # a resumed run keeps what it recorded at its start; a new one records it
    config.lora.base_checksum = recorded.get("base_checksum", "") if resumed else base_checksum(base_dir, step)
  check_base(config)
  targets_of(config)  # a bad lora.targets stops here, before the run writes anything
  return config


def base_params(config: Config, mesh: Mesh):
  """The base run's parameters that the whole resolved `config` names (`resolve_base`), sharded onto `mesh`
  by the config's logical rules, after `check_base`."""
  check_base(config)
  base_config, checkpointer = _read_base(fs.path(config.lora.base_workdir))
  boxed = _boxed_params(base_config.model)
  shardings = sharding.logical_shardings(mesh, config_lib.mesh_rules(config), boxed)
  target = {"params": checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)}
  try:
    return checkpointer.restore(config.lora.base_step, target, partial=True)["params"]
  finally:
    checkpointer.close()


def merged_params(config: Config, adapters, base) -> Any:
  """The base parameters with the adapters merged in (whole `config`: its `model` and `lora` sections)."""
  targets = targets_of(config)
  return jax.jit(lambda b, a: merge(b, a, targets, config.lora.alpha / config.lora.rank))(base, adapters)


def without_adapters(config: Config) -> Config:
  """A copy of the whole `config` with the `lora` section at its defaults: the config of the merged model."""
  plain = config.copy_and_resolve_references()
  plain.lora = config_lib.base_config().lora
  return plain
