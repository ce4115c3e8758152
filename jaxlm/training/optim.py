"""Optax optimizers, learning-rate schedules and the weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(optim_config, num_steps: int, d_model: int) -> optax.Schedule:
  """The learning-rate schedule of the `optim` sub-config: warmup, then the named decay over `num_steps`."""
  o = optim_config
  warmup = max(o.warmup_steps, 0)
  if o.schedule == "transformer":
    # Vaswani et al. (2017), eq. 3: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5),
    # scaled by learning_rate so that 1.0 reproduces the paper.
    def vaswani(step):
      step = jnp.maximum(jnp.asarray(step, jnp.float32) + 1.0, 1.0)
      return o.learning_rate * d_model**-0.5 * jnp.minimum(step**-0.5, step * max(warmup, 1) ** -1.5)

    return vaswani
  peak, end = o.learning_rate, o.learning_rate * o.end_lr_fraction
  decay_steps = max(num_steps - warmup, 1)
  if o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_fraction)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif o.schedule == "rsqrt":
    # join_schedules shifts the step by -warmup, so the decay sees 0 at the peak.
    decay = lambda step: peak * jax.lax.rsqrt(jnp.maximum(jnp.asarray(step, jnp.float32), 0.0) / max(warmup, 1) + 1.0)
  else:
    decay = optax.constant_schedule(peak)
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, decay_embeddings: bool):
  """True for the parameters that weight decay applies to.

  Matrices in Dense layers decay; norms, biases and (unless asked) embeddings
  do not. Decided by parameter path, so a test can list exactly what decays.
  """

  def decays(path, _):
    names = _path_names(path)
    leaf = names[-1]
    if leaf in ("bias", "scale"):
      return False
    if leaf == "embedding":
      return decay_embeddings
    return leaf == "kernel"

  return jax.tree_util.tree_map_with_path(decays, params)


def build(optim_config, num_steps: int, d_model: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax optimizer, schedule) for the `optim` sub-config: clipping, the named optimizer, weight-decay mask."""
  o = optim_config
  lr = schedule(o, num_steps, d_model)
  mask = lambda params: decay_mask(params, o.decay_embeddings)
  if o.name == "adamw":
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  elif o.name == "lion":
    tx = optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
  else:
    tx = optax.adafactor(
      lr, multiply_by_parameter_scale=False, weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask
    )
  if o.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx, lr
