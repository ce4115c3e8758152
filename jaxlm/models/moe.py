"""The mixture-of-experts MLP (Shazeer et al. 2017; Switch, GShard, Mixtral): a router sends each token to
`model.moe_top_k` of `model.moe_experts` SwiGLU experts, optionally beside always-on shared experts.

`layers.Stack` builds `MoeMlp` in place of the block's MLP in the layers `layers.is_moe_layer` names (the
families pass it as `moe_mlp_cls`), so scan,
remat, the decode cache and the sharding rules work as for the dense MLP. Routing choices (docs/moe.md):
- the router's logits and softmax are float32, whatever the compute dtype;
- with k >= 2 the top-k probabilities are renormalized to sum to 1 over the chosen experts (Mixtral); with
  k = 1 the chosen expert's probability is its weight (Switch), since a renormalized weight would be 1 and
  would give the router no gradient from the loss;
- the load-balancing loss is Switch's, E * sum_e f_e * P_e, with f_e the fraction of the batch's K choices
  that went to expert e and P_e the mean router probability of e (1 when balanced; Hugging Face's Mixtral
  loss is K times this), and the router z-loss is ST-MoE's mean logsumexp(logits)^2.
Each MoE layer sows its statistics into the 'intermediates' collection; `apply_with_statistics` collects
them (the mean over MoE layers) and `add_to_sums` adds the weighted losses to the loss sums of
`jaxlm.training.step`.

Parameters (Mixtral's layout): router/kernel D x E; wi_gate and wi_up E x D x F, wo E x F x D
(logical axes ('expert', 'embed', 'mlp') and ('expert', 'mlp', 'embed')); the shared experts are one dense
SwiGLU `layers.Mlp` named `shared`, of width moe_shared_experts x F. F is `model.moe_hidden`, or
`model.mlp_dim` when 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import ops
from jaxlm.models import layers

Array = jax.Array
STATISTICS = ("moe_aux", "router_z", "moe_dropped", "moe_load")


def hidden_size(cfg: ml_collections.ConfigDict) -> int:
  """The experts' FFN width F of the model sub-config: `moe_hidden`, or `mlp_dim` when 0."""
  return cfg.get("moe_hidden", 0) or cfg.mlp_dim


def _mesh_axes(logical: str, mesh_shape: dict) -> tuple[str, ...]:
  """The mesh axes of size > 1 that the logical rules in force map `logical` onto."""
  spec = nn.logical_to_mesh_axes((logical,))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return tuple(axis for axis in axes if mesh_shape.get(axis, 1) > 1)


def expert_parallel(num_rows: int) -> ops.moe.ExpertParallel | None:
  """The `ops.moe.ExpertParallel` layout for `num_rows` token rows under the mesh and logical rules in force,
  or None on one device (no mesh, or a mesh of one device).

  Rows split over the 'batch' rules' axes when they divide `num_rows` (else every device holds all rows,
  as a one-row decode on a data-parallel mesh does); experts over the 'expert' rule's, hidden widths over
  the 'mlp' rule's.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  shape = dict(mesh.shape)
  mlp = _mesh_axes("mlp", shape)
  batch = tuple(axis for axis in _mesh_axes("batch", shape) if axis not in mlp)
  if num_rows % _product(shape, batch):
    batch = ()
  return ops.moe.ExpertParallel(batch, _mesh_axes("expert", shape), mlp)


def _product(shape: dict, axes: tuple[str, ...]) -> int:
  size = 1
  for axis in axes:
    size *= shape[axis]
  return size


def _top_k(probs_BxTxE: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k` over the experts as k argmaxes: XLA's SPMD partitioner all-gathers a batch-sharded
  operand of top_k, while argmax stays split along the batch. Ties go to the lower expert index, as top_k's."""
  values, indices = [], []
  remaining_BxTxE = probs_BxTxE
  for _ in range(k):
    index_BxT = jnp.argmax(remaining_BxTxE, axis=-1)
    values.append(jnp.take_along_axis(probs_BxTxE, index_BxT[..., None], axis=-1)[..., 0])
    indices.append(index_BxT)
    remaining_BxTxE = jnp.where(jax.nn.one_hot(index_BxT, probs_BxTxE.shape[-1], dtype=bool), -1.0, remaining_BxTxE)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


class Router(nn.Module):
  """The router's D x E kernel (no bias) and its float32 logits B x T x E."""

  num_experts: int
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    kernel_DxE = self.param(
      "kernel",
      nn.with_logical_partitioning(layers._kernel_init, ("embed", None)),
      (x_BxTxD.shape[-1], self.num_experts),
      layers.DTYPES[self.cfg.param_dtype],
    )
    return jnp.einsum("btd,de->bte", x_BxTxD.astype(jnp.float32), kernel_DxE.astype(jnp.float32))


class MoeMlp(nn.Module):
  """The MoE feed-forward sublayer, B x T x D in and out; constructed like `layers.Mlp` (see the module
  docstring for the routing and the parameters). Dispatch is `model.moe_dispatch` (`jaxlm.ops.moe`)."""

  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.cfg
    num_experts, top_k, hidden = cfg.moe_experts, cfg.get("moe_top_k", 2), hidden_size(cfg)
    batch, length, d = x_BxTxD.shape
    dtype, param_dtype = layers.DTYPES[cfg.dtype], layers.DTYPES[cfg.param_dtype]
    logits_BxTxE = Router(num_experts, cfg, name="router")(x_BxTxD)
    probs_BxTxE = jax.nn.softmax(logits_BxTxE, axis=-1)
    top_probs_BxTxK, expert_index_BxTxK = _top_k(probs_BxTxE, top_k)
    combine_BxTxK = top_probs_BxTxK
    if top_k > 1:
      combine_BxTxK = top_probs_BxTxK / jnp.sum(top_probs_BxTxK, axis=-1, keepdims=True)

    def expert_param(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(layers._kernel_init, axes), shape, param_dtype)

    wi_gate = expert_param("wi_gate", (num_experts, d, hidden), ("expert", "embed", "mlp"))
    wi_up = expert_param("wi_up", (num_experts, d, hidden), ("expert", "embed", "mlp"))
    wo = expert_param("wo", (num_experts, hidden, d), ("expert", "mlp", "embed"))
    dispatch = cfg.get("moe_dispatch", "dropless")
    slots = ops.moe.capacity(length, top_k, num_experts, cfg.get("moe_capacity_factor", 1.25))
    out_BxTxD = ops.moe.moe_ffn(
      x_BxTxD.astype(dtype),
      expert_index_BxTxK,
      combine_BxTxK,
      wi_gate.astype(dtype),
      wi_up.astype(dtype),
      wo.astype(dtype),
      dispatch=dispatch,
      capacity=slots,
      parallel=expert_parallel(batch),
    )
    self._sow_statistics(logits_BxTxE, probs_BxTxE, expert_index_BxTxK, dispatch, slots)
    if cfg.get("moe_shared_experts", 0):
      shared_cfg = ml_collections.ConfigDict(
        {**cfg.to_dict(), "mlp": "swiglu", "mlp_dim": cfg.moe_shared_experts * hidden}
      )
      out_BxTxD = out_BxTxD + layers.Mlp(shared_cfg, self.deterministic, name="shared")(x_BxTxD)
    return nn.with_logical_constraint(out_BxTxD, ("batch", "length", "embed"))

  def _sow_statistics(self, logits_BxTxE, probs_BxTxE, expert_index_BxTxK, dispatch: str, slots: int) -> None:
    """Sows this layer's load-balancing loss, z-loss, dropped fraction and load per expert (fractions of the
    choices, E of them) into 'intermediates'; a no-op unless the caller made it mutable."""
    num_experts = probs_BxTxE.shape[-1]
    chosen_BxTxKxE = jax.nn.one_hot(expert_index_BxTxK, num_experts, dtype=jnp.float32)
    load_E = jnp.mean(chosen_BxTxKxE, axis=(0, 1, 2))
    router_probability_E = jnp.mean(probs_BxTxE, axis=(0, 1))
    self.sow("intermediates", "moe_aux", num_experts * jnp.sum(load_E * router_probability_E))
    self.sow("intermediates", "router_z", jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxE, axis=-1))))
    dropped = jnp.zeros((), jnp.float32)
    if ops.moe.REGISTRY[dispatch].drops:
      dropped = 1.0 - jnp.mean(ops.moe.capacity_keep(expert_index_BxTxK, num_experts, slots).astype(jnp.float32))
    self.sow("intermediates", "moe_dropped", dropped)
    self.sow("intermediates", "moe_load", load_E)


def statistics(intermediates) -> dict[str, Array]:
  """The MoE layers' sown statistics, each the mean over the MoE layers.

  Args:
    intermediates: the 'intermediates' collection of an apply (scanned layers stack theirs along axis 0).

  Returns:
    {'moe_aux', 'router_z', 'moe_dropped': scalars; 'moe_load': E fractions of the routed choices}; {} when
    no layer sowed them.
  """
  found: dict[str, list[Array]] = {name: [] for name in STATISTICS}
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    names = [getattr(entry, "key", None) for entry in path]
    for name in STATISTICS:
      if name in names:
        found[name].append(value)
  if not found["moe_aux"]:
    return {}
  num_experts = found["moe_load"][0].shape[-1]
  result = {name: jnp.mean(jnp.concatenate([v.reshape(-1) for v in found[name]])) for name in STATISTICS[:3]}
  result["moe_load"] = jnp.mean(jnp.concatenate([v.reshape(-1, num_experts) for v in found["moe_load"]]), axis=0)
  return result


def apply_with_statistics(model: nn.Module, params, inputs: dict, rngs: dict) -> tuple[Any, dict[str, Array]]:
  """`model.apply({'params': params}, **inputs, rngs=rngs)` and its MoE `statistics` ({} for a dense model,
  whose apply runs as before, with no collection made mutable)."""
  cfg = getattr(model, "cfg", None)
  if cfg is None or not cfg.get("moe_experts", 0):
    return model.apply({"params": params}, **inputs, rngs=rngs), {}
  out, state = model.apply({"params": params}, **inputs, rngs=rngs, mutable=["intermediates"])
  return out, statistics(state.get("intermediates", {}))


def add_to_sums(sums: dict[str, Array], stats: dict[str, Array], cfg: ml_collections.ConfigDict) -> dict[str, Array]:
  """Token-weighted loss sums with the MoE losses: `loss_sum` gains weight_sum x (moe_aux_loss_weight x aux +
  moe_z_loss_weight x z), so the objective per token gains the weighted losses; the statistics come back as
  `*_sum` keys scaled by weight_sum (logged divided by it): moe_aux_sum, router_z_sum, moe_dropped_sum, and
  moe_load_max_sum / moe_load_min_sum, the busiest and idlest expert's load times E (1 when balanced).

  Args:
    sums: the sums of a `jaxlm.training.step.LossFn` (with 'loss_sum' and 'weight_sum').
    stats: `statistics(...)`; {} returns `sums` unchanged.
    cfg: the model sub-config (the loss weights).

  Returns:
    A new dict of sums.
  """
  if not stats:
    return sums
  weight = sums["weight_sum"]
  penalty = (
    cfg.get("moe_aux_loss_weight", 0.01) * stats["moe_aux"] + cfg.get("moe_z_loss_weight", 0.001) * stats["router_z"]
  )
  num_experts = stats["moe_load"].shape[-1]
  return {
    **sums,
    "loss_sum": sums["loss_sum"] + weight * penalty,
    "moe_aux_sum": weight * stats["moe_aux"],
    "router_z_sum": weight * stats["router_z"],
    "moe_dropped_sum": weight * stats["moe_dropped"],
    "moe_load_max_sum": weight * num_experts * jnp.max(stats["moe_load"]),
    "moe_load_min_sum": weight * num_experts * jnp.min(stats["moe_load"]),
  }
