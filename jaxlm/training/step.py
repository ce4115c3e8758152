"""The train state, the loss, and the jit-compiled train and eval steps.

One step function, jit-compiled with explicit in/out shardings: the state is
donated and stays sharded by the logical rules; the batch is sharded along
the data axes. Gradient accumulation runs inside the step as a `lax.scan`
over micro-batches, summing token-weighted losses and gradients so the
result equals the big batch's (no `optax.MultiSteps` buffer). The trainer
compiles the step ahead of time (`compile_train_step`), checks XLA's memory
estimate of it (`jaxlm.training.memory`) and runs that executable.

What is open: `setup` takes any Flax module that meets `jaxlm.families.LanguageModel`
(default: the family's model from `config.model`) and any `LossFn` (default:
`cross_entropy_loss`, token-weighted cross-entropy with z-loss and label smoothing).
A loss's extra `NAME_sum` terms are reported as NAME (`loss_terms`), in training
and validation alike. `config` is always the whole config; `model_cfg` the model sub-config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.config import Config
from jaxlm.errors import JaxlmError
from jaxlm.models import layers, moe
from jaxlm.models import transformer as model_lib
from jaxlm.parallel import sharding
from jaxlm.training import optim


class LossFnError(JaxlmError, TypeError):
  """A `LossFn` whose sums break the contract (a missing key, a key not named NAME_sum); one line naming it."""


class LossFn(Protocol):
  """The contract of a training objective: `loss_fn(model, params, batch, rngs) -> sums`.

  Any function with this signature is one (`cross_entropy_loss(config.train)` is the default). It returns
  token-weighted SUMS over the batch, not means, so micro-batches and hosts add up exactly: the step adds
  the sums of every micro-batch and device first, then divides by 'weight_sum'.
  """

  def __call__(self, model: nn.Module, params: Any, batch: dict, rngs: dict) -> dict[str, jax.Array]:
    """The objective's sums over one batch.

    Args:
      model: the Flax module being trained (dropout on in training, off in evaluation).
      params: its parameter tree.
      batch: a dict of B x T arrays (for the decoder: inputs, targets, segment_ids, positions, weights). Pass
        the model all of its inputs (`jaxlm.families.model_inputs(model, batch)`): a decoder given `inputs`
        alone attends across the documents packed into a row.
      rngs: {'dropout': key} in training, {} in evaluation; pass it to `model.apply(..., rngs=rngs)`.

    Returns:
      A dict of scalar sums. Required: 'loss_sum' (what is minimized) and 'weight_sum' (the tokens it
      covers). Optional: 'nll_sum' (reported as `loss`; default 'loss_sum') and 'correct_sum' (accuracy in
      `jaxlm eval`). Every other key must be named NAME_sum, e.g. 'z_loss_sum' or 'aux_sum': it is reported
      as NAME = sum / weight_sum in metrics.jsonl, TensorBoard and the log line, and as val_NAME after each
      validation. Add a term into 'loss_sum' yourself to train on it; the extra keys are only reported.
    """
    ...


BUILT_IN_SUMS = ("loss_sum", "weight_sum", "nll_sum", "correct_sum")  # what the step reads itself
# The train step's own metrics and the trainer's, which an extra term's name must not shadow.
_RESERVED_NAMES = (
  "loss",
  "objective",
  "grad_norm",
  "learning_rate",
  "tokens",
  "accuracy",
  "step_time_s",
  "tokens_per_s",
  "peak_flops",
  "mfu",
  "batch_crc32",
)


def check_sums(sums: Mapping[str, Any]) -> None:
  """Raises LossFnError unless `sums` (a `LossFn`'s result, arrays or shapes) meets the `LossFn` contract."""
  if not isinstance(sums, Mapping):
    raise LossFnError(
      f"loss_fn returned a {type(sums).__name__}; return a dict of sums with 'loss_sum' and 'weight_sum'"
    )
  for key in ("loss_sum", "weight_sum"):
    if key not in sums:
      raise LossFnError(
        f"loss_fn returned no '{key}' (keys: {', '.join(sorted(sums)) or 'none'}); return 'loss_sum' (the "
        "token-weighted sum to minimize) and 'weight_sum' (the tokens it covers)"
      )
  for key, value in sums.items():
    if not key.endswith("_sum") or key == "_sum":
      raise LossFnError(
        f"loss_fn returned '{key}': every key must be a token-weighted sum named NAME_sum (e.g. '{key}_sum'), "
        "which is reported as NAME = sum / weight_sum"
      )
    if key not in BUILT_IN_SUMS and key.removesuffix("_sum") in _RESERVED_NAMES:
      raise LossFnError(
        f"loss_fn returned '{key}', whose metric name '{key.removesuffix('_sum')}' is the trainer's own; rename it"
      )
    if jnp.ndim(value) != 0:
      raise LossFnError(f"loss_fn returned '{key}' of shape {jnp.shape(value)}; every sum must be a scalar")


def loss_terms(sums: Mapping[str, Any], weight) -> dict[str, Any]:
  """The extra terms of a `LossFn`'s sums: NAME -> sums['NAME_sum'] / weight, for each key not in `BUILT_IN_SUMS`.

  Args:
    sums: the sums, added over micro-batches, devices and batches (arrays or floats).
    weight: what to divide by: the summed 'weight_sum' (at least 1).

  Returns:
    {NAME: mean}, e.g. {'z_loss': ...} for a 'z_loss_sum'.
  """
  return {key.removesuffix("_sum"): value / weight for key, value in sums.items() if key not in BUILT_IN_SUMS}


class TrainState(struct.PyTreeNode):
  """The training state as one pytree, sharded by `Setup.state_shardings`.

  step: int32 scalar, the number of updates applied. params: the model's parameter tree.
  opt_state: the optax state of `Setup.tx`. `to_dict()` is the checkpoint layout.
  """

  step: jax.Array
  params: Any
  opt_state: Any

  def to_dict(self) -> dict:
    """{'step', 'params', 'opt_state'}: what `jaxlm.storage.checkpoint.Checkpointer.save` stores."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


@dataclasses.dataclass
class Setup:
  """Everything built from a whole config and a mesh, before any array exists.

  `abstract_state` holds the TrainState's shapes and `state_shardings` its NamedShardings; `init_fn(rng)`
  makes a fresh TrainState; `loss_fn` is the objective the steps use.
  """

  config: Any
  mesh: Mesh
  rules: tuple
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init_fn: Callable
  loss_fn: LossFn


def example_batch(config: Config, batch_size: int) -> dict[str, jax.Array]:
  """A batch of the family's structure, `batch_size` x `config.data.seq_len` (whole config)."""
  shape = (batch_size, config.data.seq_len)
  return model_lib.example_batch(config.model, shape)


def setup(config: Config, mesh: Mesh, model: nn.Module | None = None, loss_fn: LossFn | None = None) -> Setup:
  """Builds the model, optimizer, shapes and shardings of a run; allocates nothing.

  config: the whole config. mesh: a Mesh with axes ('data', 'fsdp', 'tensor').
  model: a Flax module meeting `jaxlm.families.LanguageModel`; default the family's model of `config.model`,
    with dropout on. loss_fn: a `LossFn`; default `cross_entropy_loss(config.train)`.
  """
  rules = config_lib.mesh_rules(config)
  model = model if model is not None else model_lib.build(config.model, deterministic=False)
  loss_fn = loss_fn or cross_entropy_loss(config.train)
  tx, schedule = optim.build(config.optim, config.train.num_steps, config.model.d_model)
  batch = example_batch(config, 1)

  def init_boxed(rng):
    return model.init({"params": rng, "dropout": rng}, **families.model_inputs(model, batch))["params"]

  def init_fn(rng):
    params = nn.meta.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.key(0)
  param_shardings = sharding.logical_shardings(mesh, rules, jax.eval_shape(init_boxed, rng))
  abstract_state = jax.eval_shape(init_fn, rng)
  state_shardings = sharding.state_shardings(mesh, tx, abstract_state, param_shardings)
  return Setup(
    config,
    mesh,
    rules,
    model,
    tx,
    schedule,
    abstract_state,
    state_shardings,
    sharding.batch_sharding(mesh, rules),
    init_fn,
    loss_fn,
  )


def create_state(s: Setup, seed: int) -> TrainState:
  """Initializes the state directly into its shardings; no host holds it whole."""
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    return jax.jit(s.init_fn, out_shardings=s.state_shardings)(jax.random.key(seed))


def cross_entropy(
  logits_BxTxV: jax.Array,
  targets_BxT: jax.Array,
  weights_BxT: jax.Array,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
  """Token-weighted sums (not means), so micro-batches and hosts add up exactly."""
  logits = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = log_z_BxT - target_logit_BxT
  loss_BxT = nll_BxT
  if label_smoothing:
    smooth_BxT = log_z_BxT - jnp.mean(logits, axis=-1)
    loss_BxT = (1 - label_smoothing) * nll_BxT + label_smoothing * smooth_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * jnp.square(log_z_BxT)
  correct_BxT = (jnp.argmax(logits, axis=-1) == targets_BxT).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(loss_BxT * weights_BxT),
    "nll_sum": jnp.sum(nll_BxT * weights_BxT),
    "weight_sum": jnp.sum(weights_BxT),
    "correct_sum": jnp.sum(correct_BxT * weights_BxT),
  }


def cross_entropy_loss(train_config) -> LossFn:
  """The default `LossFn`: `cross_entropy` of the model's logits against batch['targets'], weighted by
  batch['weights'], with `train_config.z_loss` and `train_config.label_smoothing` (the `config.train` section);
  a mixture-of-experts model adds its weighted load-balancing and router z-losses (`moe.add_to_sums`)."""

  def loss_fn(model: nn.Module, params, batch: dict, rngs: dict) -> dict[str, jax.Array]:
    logits_BxTxV, moe_stats = moe.apply_with_statistics(model, params, families.model_inputs(model, batch), rngs)
    sums = cross_entropy(
      logits_BxTxV, batch["targets"], batch["weights"], train_config.z_loss, train_config.label_smoothing
    )
    return moe.add_to_sums(sums, moe_stats, model.cfg) if moe_stats else sums

  return loss_fn


def batch_sums(
  model: nn.Module, params, batch, train_config: config_lib.ConfigDict, dropout_rng=None
) -> dict[str, jax.Array]:
  """`cross_entropy_loss(train_config)` on one batch; dropout only when `dropout_rng` is given."""
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
  return cross_entropy_loss(train_config)(model, params, batch, rngs)


def make_train_step(s: Setup):
  """The jitted step `(state, batch, rng) -> (state, metrics)`; the state is donated.

  `batch` is a global batch (B x T arrays sharded by `s.batch_sharding`); with
  `train.num_micro_batches` = M it is split into M micro-batches inside the step. metrics: loss (nll per
  weighted token), objective, grad_norm, learning_rate, tokens, and the loss's extra terms (`loss_terms`).
  """
  cfg = s.config
  num_micro = cfg.train.num_micro_batches
  row_sharding = NamedSharding(s.mesh, PartitionSpec(None, *s.batch_sharding.spec))

  def grads_and_sums(params, batch, rng):
    def loss_fn(p):
      sums = s.loss_fn(s.model, p, batch, {"dropout": rng})
      check_sums(sums)  # at trace time: a bad key stops the compilation in one line
      return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(params)
    return grads, sums

  def step_fn(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if num_micro == 1:
      grads, sums = grads_and_sums(state.params, batch, rng)
    else:
      # Micro-batch m takes rows m, m+M, m+2M, ...: every device keeps its own rows.
      def split(x_GxT):
        x = x_GxT.reshape(x_GxT.shape[0] // num_micro, num_micro, *x_GxT.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, row_sharding)

      micro_batches = jax.tree.map(split, batch)

      def accumulate(carry, xs):
        micro_batch, index = xs
        grads, sums = grads_and_sums(state.params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(grads_and_sums, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng)
      )
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(num_micro)))
    weight = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": sums.get("nll_sum", sums["loss_sum"]) / weight,
      "objective": sums["loss_sum"] / weight,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": s.schedule(state.step),
      "tokens": sums["weight_sum"],
      **loss_terms(sums, weight),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  jitted = jax.jit(
    step_fn,
    in_shardings=(s.state_shardings, s.batch_sharding, None),
    out_shardings=(s.state_shardings, None),
    donate_argnums=(0,),
  )
  return under_mesh(s.mesh, s.rules, jitted)


def abstract_step_arguments(s: Setup) -> tuple[TrainState, dict, jax.ShapeDtypeStruct]:
  """The train step's arguments as `jax.ShapeDtypeStruct`s carrying the shardings the trainer passes.

  Returns (state, batch, rng): the state in `s.state_shardings` (as `create_state` and a restore place it);
  a global batch of the family's structure, `train.global_batch_size` x `data.seq_len`, in
  `s.batch_sharding` (as `sharding.global_batch` places it); and an unplaced key, as `jax.random.key`
  makes it (the step leaves its sharding unspecified).
  """
  state = jax.tree.map(
    lambda a, placement: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement), s.abstract_state, s.state_shardings
  )
  batch = jax.eval_shape(lambda: example_batch(s.config, s.config.train.global_batch_size))
  batch = {
    key: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s.batch_sharding) for key, value in batch.items()
  }
  return state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)


class CompiledStep:
  """The train step compiled ahead of time; call it as `(state, batch, rng) -> (state, metrics)`.

  `compiled` is the `jax.stages.Compiled` executable (its `memory_analysis()` is what `jaxlm.training.memory`
  reads), `jitted` the `make_train_step` function it was lowered from. Batches of the structure, shapes
  and dtypes it was compiled for (`compiled_for`) run the executable. Any other batch (user batches with
  other keys, an encoder-decoder whose data.target_len differs from data.seq_len) runs the jitted function,
  which compiles for it: the executable refuses other shapes rather than recompiling.
  """

  def __init__(self, jitted, compiled: jax.stages.Compiled, abstract_batch: dict):
    self.jitted, self.compiled = jitted, compiled
    self._batch_structure = jax.tree.structure(abstract_batch)
    self._batch_types = [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(abstract_batch)]

  def compiled_for(self, batch: dict) -> bool:
    """Whether `batch` (a dict of arrays) has the keys, shapes and dtypes the executable was compiled for."""
    return (
      jax.tree.structure(batch) == self._batch_structure
      and [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(batch)] == self._batch_types
    )

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    """One step: `(state, global batch, key) -> (new state, metrics)`; `state` is donated."""
    return (self.compiled if self.compiled_for(batch) else self.jitted)(state, batch, rng)


def compile_train_step(s: Setup) -> CompiledStep:
  """`make_train_step(s)` lowered on `abstract_step_arguments(s)` and compiled ahead of time.

  Compiling runs nothing and allocates no buffer, so this can precede the state. The executable keeps the
  step's donation and shardings, so the trainer runs it and the step compiles once. Raises what XLA raises
  (on TPU, RESOURCE_EXHAUSTED when the program cannot fit).
  """
  jitted = make_train_step(s)
  state, batch, rng = abstract_step_arguments(s)
  return CompiledStep(jitted, jitted.lower(state, batch, rng).compile(), batch)


def evaluation_mode(model: nn.Module) -> nn.Module:
  """`model` with dropout off: cloned with `deterministic=True` when it has that field."""
  return model.clone(deterministic=True) if hasattr(model, "deterministic") else model


def make_eval_step(s: Setup, params_shardings):
  """The jitted `(params, batch) -> sums` of `s.loss_fn` with dropout off; see `eval_step_for`."""
  return eval_step_for(s.model, s.loss_fn, s.mesh, s.rules, params_shardings, s.batch_sharding)


def eval_step_for(
  model: nn.Module, loss_fn: LossFn, mesh: Mesh, rules, params_shardings, batch_sharding: NamedSharding
):
  """The jitted `(params, global batch) -> loss sums` of `model` in evaluation mode, under `mesh` and the
  logical `rules`; it needs no optimizer, so `jaxlm.tasks.evaluate` builds it from a loaded run."""
  model = evaluation_mode(model)

  def eval_fn(params, batch):
    sums = loss_fn(model, params, batch, {})
    check_sums(sums)
    return sums

  return under_mesh(mesh, rules, jax.jit(eval_fn, in_shardings=(params_shardings, batch_sharding)))


def make_logits_fn(s: Setup, params_shardings):
  """The jitted `(params, global batch) -> logits` of `s.model` in evaluation mode, under the run's mesh and rules.

  Args:
    s: the run's `Setup`.
    params_shardings: the params' NamedShardings (`s.state_shardings.params`).

  Returns:
    The function; its logits are B x T x V, sharded as the batch.
  """
  model = evaluation_mode(s.model)

  def logits_fn(params, batch):
    return model.apply({"params": params}, **families.model_inputs(model, batch))

  return under_mesh(s.mesh, s.rules, jax.jit(logits_fn, in_shardings=(params_shardings, s.batch_sharding)))


def evaluate_loss(eval_step, params, batches: Iterable[dict], batch_sharding: NamedSharding) -> dict[str, float]:
  """The loss sums of `params` over this process's local `batches`: training validation and `jaxlm eval`.

  Args:
    eval_step: `(params, global batch) -> sums`, as `eval_step_for` makes.
    params: the parameter tree.
    batches: process-local batches.
    batch_sharding: places each local batch into a global one (`sharding.global_batch`).

  Returns:
    Each key of the sums, summed over the batches, as a float.
  """
  totals = {}
  for local in batches:
    sums = eval_step(params, sharding.global_batch(local, batch_sharding))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  return totals


def under_mesh(mesh: Mesh, rules, fn):
  """`fn` run (and lowered, via `.lower`) under `mesh` and the logical `rules`, which the model's
  sharding constraints need."""

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  def lower(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn.lower(*args)

  wrapped.lower = lower
  return wrapped


def compute_dtype(config: Config):
  """The jnp dtype of `config.model.dtype` (whole config)."""
  return layers.DTYPES[config.model.dtype]
