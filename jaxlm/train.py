"""The train state, the loss, and the jit-compiled train and eval steps.

One step function, jit-compiled with explicit in/out shardings: the state is
donated and stays sharded by the logical rules; the batch is sharded along
the data axes. Gradient accumulation runs inside the step as a `lax.scan`
over micro-batches, summing token-weighted losses and gradients so the
result equals the big batch's (no `optax.MultiSteps` buffer).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import layers, optim, sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any

  def to_dict(self) -> dict:
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


@dataclasses.dataclass
class Setup:
  """Everything built from a config and a mesh, before any array exists."""
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


def example_batch(config, batch_size: int) -> dict[str, jax.Array]:
  shape = (batch_size, config.data.seq_len)
  return model_lib.example_batch(config.model, shape)


def setup(config, mesh: Mesh) -> Setup:
  rules = config_lib.mesh_rules(config)
  model = model_lib.build(config.model, deterministic=False)
  tx, schedule = optim.build(config.optim, config.train.num_steps, config.model.d_model)
  batch = example_batch(config, 1)

  def init_boxed(rng):
    return model.init({"params": rng, "dropout": rng}, **model_lib.model_inputs(config.model, batch))["params"]

  def init_fn(rng):
    params = nn.meta.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.key(0)
  param_shardings = sharding.logical_shardings(mesh, rules, jax.eval_shape(init_boxed, rng))
  abstract_state = jax.eval_shape(init_fn, rng)
  state_shardings = sharding.state_shardings(mesh, tx, abstract_state, param_shardings)
  return Setup(config, mesh, rules, model, tx, schedule, abstract_state, state_shardings,
               sharding.batch_sharding(mesh, rules), init_fn)


def create_state(s: Setup, seed: int) -> TrainState:
  """Initializes the state directly into its shardings; no host holds it whole."""
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    return jax.jit(s.init_fn, out_shardings=s.state_shardings)(jax.random.key(seed))


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                  z_loss: float = 0.0, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
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
  return {"loss_sum": jnp.sum(loss_BxT * weights_BxT), "nll_sum": jnp.sum(nll_BxT * weights_BxT),
          "weight_sum": jnp.sum(weights_BxT), "correct_sum": jnp.sum(correct_BxT * weights_BxT)}


def batch_sums(model: nn.Module, params, batch, train_config, dropout_rng=None) -> dict[str, jax.Array]:
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
  logits = model.apply({"params": params}, **model_lib.model_inputs(model.cfg, batch), rngs=rngs)
  return cross_entropy(logits, batch["targets"], batch["weights"], train_config.z_loss, train_config.label_smoothing)


def make_train_step(s: Setup):
  cfg = s.config
  num_micro = cfg.train.num_micro_batches
  row_sharding = NamedSharding(s.mesh, PartitionSpec(None, *s.batch_sharding.spec))

  def grads_and_sums(params, batch, rng):
    def loss_fn(p):
      sums = batch_sums(s.model, p, batch, cfg.train, rng)
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

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_and_sums, state.params,
                                                          jax.tree.map(lambda x: x[0], micro_batches), rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(num_micro)))
    weight = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums["nll_sum"] / weight, "objective": sums["loss_sum"] / weight,
               "grad_norm": optax.tree.norm(grads), "learning_rate": s.schedule(state.step),
               "tokens": sums["weight_sum"]}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  jitted = jax.jit(step_fn, in_shardings=(s.state_shardings, s.batch_sharding, None),
                   out_shardings=(s.state_shardings, None), donate_argnums=(0,))
  return _with_mesh(s, jitted)


def make_eval_step(s: Setup, params_shardings):
  def eval_fn(params, batch):
    return batch_sums(s.model.clone(deterministic=True), params, batch, s.config.train)
  return _with_mesh(s, jax.jit(eval_fn, in_shardings=(params_shardings, s.batch_sharding)))


def _with_mesh(s: Setup, fn):
  """Runs `fn` under the mesh and the logical rules, which the model's constraints need."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      return fn(*args)
  wrapped.lower = lambda *args: _lower_under_mesh(s, fn, *args)
  return wrapped


def _lower_under_mesh(s: Setup, fn, *args):
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    return fn.lower(*args)


def compute_dtype(config):
  return layers.DTYPES[config.model.dtype]
