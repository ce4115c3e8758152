"""The mixture-of-experts op: routed tokens through SwiGLU experts, with one table of dispatch implementations.

Extension point. A dispatch implementation is a function

    fn(x_GxSxD, expert_index_GxSxK, combine_GxSxK, wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD, *,
       first_expert, num_experts, capacity) -> out_GxSxD

  x_GxSxD:        tokens in the compute dtype, in G groups (rows) of S tokens; capacity is counted per group.
  expert_index_GxSxK: int32, the global expert of each of a token's K choices (distinct experts).
  combine_GxSxK:  float32 weight of each choice.
  wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD: the E experts this call holds, global experts first_expert ..
                  first_expert + E - 1: all of them on one device, the local shard under expert parallelism.
                  A choice of an expert held elsewhere adds nothing here.
  first_expert:   int or int32 scalar (the device's shard index times E under `jax.shard_map`).
  num_experts:    the global number of experts.
  capacity:       slots per expert and group (`capacity`); implementations that never drop ignore it.
  Returns out_GxSxD = sum over the held choices of combine * wo(silu(x wi_gate) * x wi_up), in x's dtype.

Register it with `register_moe_dispatch(name, fn, drops=...)`; `--config.model.moe_dispatch=NAME` then picks it
(the config's allowed names are this registry's). Built in: "dropless" (tokens sorted by expert, grouped matmuls
with `jax.lax.ragged_dot`), "capacity" (GShard/Switch: fixed slots per expert and group, overflow dropped) and
"dense" (every expert on every token: the reference the tests compare the others with).

`moe_ffn` runs the chosen implementation, on one device or, under a mesh, inside `jax.shard_map`: each
device all-gathers the tokens of its expert-parallel peers, runs its own experts on them and reduce-scatters
the result back (docs/moe.md, "Expert parallelism").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array


class DispatchFn(Protocol):
  """The signature every dispatch implementation has (see the module docstring)."""

  def __call__(
    self,
    x_GxSxD: Array,
    expert_index_GxSxK: Array,
    combine_GxSxK: Array,
    wi_gate_ExDxF: Array,
    wi_up_ExDxF: Array,
    wo_ExFxD: Array,
    *,
    first_expert,
    num_experts: int,
    capacity: int,
  ) -> Array: ...


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """A registered dispatch: its function, and whether it drops choices beyond `capacity` (`capacity_keep`)."""

  fn: DispatchFn
  drops: bool = False


REGISTRY: dict[str, Dispatch] = {}


def register_moe_dispatch(name: str, fn: DispatchFn, *, drops: bool = False) -> Dispatch:
  """Adds (or replaces) a dispatch implementation.

  Args:
    name: the value of `model.moe_dispatch` that selects it.
    fn: the implementation (see the module docstring).
    drops: True when it drops the choices that `capacity_keep` marks as overflow (so the model reports them).

  Returns:
    The registered `Dispatch`.
  """
  REGISTRY[name] = Dispatch(fn, drops)
  return REGISTRY[name]


def capacity(group_size: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert and group: ceil(capacity_factor * group_size * top_k / num_experts), at most group_size
  (a token's choices are distinct experts, so no expert can receive more)."""
  return min(group_size, math.ceil(capacity_factor * group_size * top_k / num_experts))


def _slots(expert_index_GxSxK: Array, num_experts: int) -> Array:
  """Each choice's place in its expert's queue within its group, in Switch/GShard priority: every token's
  first choice (in token order) before any second choice, and so on."""
  g, s, k = expert_index_GxSxK.shape
  by_rank_GxKS = jnp.swapaxes(expert_index_GxSxK, 1, 2).reshape(g, k * s)
  one_hot_GxKSxE = jax.nn.one_hot(by_rank_GxKS, num_experts, dtype=jnp.int32)
  slot_GxKS = jnp.sum((jnp.cumsum(one_hot_GxKSxE, axis=1) - 1) * one_hot_GxKSxE, axis=-1)
  return jnp.swapaxes(slot_GxKS.reshape(g, k, s), 1, 2)


def capacity_keep(expert_index_GxSxK: Array, num_experts: int, slots_per_expert: int) -> Array:
  """Boolean G x S x K: the choices that get one of their expert's `slots_per_expert` slots in their group."""
  return _slots(expert_index_GxSxK, num_experts) < slots_per_expert


def _swiglu(h_gate: Array, h_up: Array) -> Array:
  return jax.nn.silu(h_gate) * h_up


def dense_dispatch(
  x_GxSxD,
  expert_index_GxSxK,
  combine_GxSxK,
  wi_gate_ExDxF,
  wi_up_ExDxF,
  wo_ExFxD,
  *,
  first_expert,
  num_experts,
  capacity,
):
  """Every held expert on every token, weighted by the choices: E times the FLOPs, the reference."""
  h_ExGxSxF = _swiglu(
    jnp.einsum("gsd,edf->egsf", x_GxSxD, wi_gate_ExDxF), jnp.einsum("gsd,edf->egsf", x_GxSxD, wi_up_ExDxF)
  )
  y_ExGxSxD = jnp.einsum("egsf,efd->egsd", h_ExGxSxF, wo_ExFxD)
  # one_hot of an expert held elsewhere (outside 0..E-1) is all zeros.
  local_GxSxKxE = jax.nn.one_hot(expert_index_GxSxK - first_expert, wi_gate_ExDxF.shape[0], dtype=jnp.float32)
  weight_GxSxE = jnp.einsum("gsk,gske->gse", combine_GxSxK, local_GxSxKxE)
  out_GxSxD = jnp.einsum("gse,egsd->gsd", weight_GxSxE, y_ExGxSxD.astype(jnp.float32))
  return out_GxSxD.astype(x_GxSxD.dtype)


def dropless_dispatch(
  x_GxSxD,
  expert_index_GxSxK,
  combine_GxSxK,
  wi_gate_ExDxF,
  wi_up_ExDxF,
  wo_ExFxD,
  *,
  first_expert,
  num_experts,
  capacity,
):
  """Choices sorted by expert, each expert's rows one group of `jax.lax.ragged_dot`, unsorted and summed back."""
  g, s, d = x_GxSxD.shape
  k, num_local = expert_index_GxSxK.shape[-1], wi_gate_ExDxF.shape[0]
  local_M = (expert_index_GxSxK - first_expert).reshape(-1)  # M = G*S*K choices
  held_M = (local_M >= 0) & (local_M < num_local)
  # Choices of experts held elsewhere sort last, past every group: ragged_dot leaves those rows zero.
  key_M = jnp.where(held_M, local_M, num_local)
  order_M = jnp.argsort(key_M, stable=True)
  group_sizes_E = jnp.bincount(key_M, length=num_local + 1)[:num_local].astype(jnp.int32)
  token_M = order_M // k
  x_MxD = x_GxSxD.reshape(g * s, d)[token_M]
  h_MxF = _swiglu(
    jax.lax.ragged_dot(x_MxD, wi_gate_ExDxF, group_sizes_E), jax.lax.ragged_dot(x_MxD, wi_up_ExDxF, group_sizes_E)
  )
  y_MxD = jax.lax.ragged_dot(h_MxF, wo_ExFxD, group_sizes_E).astype(jnp.float32)
  weight_M = jnp.where(held_M, combine_GxSxK.reshape(-1), 0.0)[order_M]
  out_NxD = jnp.zeros((g * s, d), jnp.float32).at[token_M].add(y_MxD * weight_M[:, None])
  return out_NxD.reshape(g, s, d).astype(x_GxSxD.dtype)


def capacity_dispatch(
  x_GxSxD,
  expert_index_GxSxK,
  combine_GxSxK,
  wi_gate_ExDxF,
  wi_up_ExDxF,
  wo_ExFxD,
  *,
  first_expert,
  num_experts,
  capacity,
):
  """GShard/Switch: each held expert gets `capacity` slots per group, filled in `capacity_keep`'s priority;
  a choice without a slot is dropped (the token keeps its other choices, and the residual)."""
  g, s, d = x_GxSxD.shape
  num_local = wi_gate_ExDxF.shape[0]
  slot_GxSxK = _slots(expert_index_GxSxK, num_experts)
  local_GxSxK = expert_index_GxSxK - first_expert
  kept_GxSxK = (local_GxSxK >= 0) & (local_GxSxK < num_local) & (slot_GxSxK < capacity)
  # Indices out of range (not held, or no slot) are dropped by the scatter and read as zero by the gather.
  expert_GxSxK = jnp.where(kept_GxSxK, local_GxSxK, num_local)
  row_Gx1x1 = jnp.arange(g)[:, None, None]
  tokens_GxSxKxD = jnp.broadcast_to(x_GxSxD[:, :, None, :], (*expert_index_GxSxK.shape, d))
  buffer_GxExCxD = (
    jnp.zeros((g, num_local, capacity, d), x_GxSxD.dtype)
    .at[row_Gx1x1, expert_GxSxK, slot_GxSxK]
    .set(tokens_GxSxKxD, mode="drop")
  )
  h_GxExCxF = _swiglu(
    jnp.einsum("gecd,edf->gecf", buffer_GxExCxD, wi_gate_ExDxF),
    jnp.einsum("gecd,edf->gecf", buffer_GxExCxD, wi_up_ExDxF),
  )
  y_GxExCxD = jnp.einsum("gecf,efd->gecd", h_GxExCxF, wo_ExFxD)
  y_GxSxKxD = y_GxExCxD.at[row_Gx1x1, expert_GxSxK, slot_GxSxK].get(mode="fill", fill_value=0)
  weight_GxSxK = jnp.where(kept_GxSxK, combine_GxSxK, 0.0)
  out_GxSxD = jnp.einsum("gsk,gskd->gsd", weight_GxSxK, y_GxSxKxD.astype(jnp.float32))
  return out_GxSxD.astype(x_GxSxD.dtype)


register_moe_dispatch("dropless", dropless_dispatch)
register_moe_dispatch("capacity", capacity_dispatch, drops=True)
register_moe_dispatch("dense", dense_dispatch)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where the MoE op's arrays live on the mesh set with `jax.set_mesh`, as mesh axis names.

  batch_axes: the axes splitting the token rows. expert_axes: the axes splitting the experts; those that also
  split the rows are gathered over and reduce-scattered back, the others summed over. mlp_axes: the axes
  splitting the experts' hidden width F (tensor parallelism), summed over.
  """

  batch_axes: tuple[str, ...] = ()
  expert_axes: tuple[str, ...] = ()
  mlp_axes: tuple[str, ...] = ()


def _spec_axis(axes: tuple[str, ...]):
  return axes or None


def moe_ffn(
  x_GxSxD: Array,
  expert_index_GxSxK: Array,
  combine_GxSxK: Array,
  wi_gate_ExDxF: Array,
  wi_up_ExDxF: Array,
  wo_ExFxD: Array,
  *,
  dispatch: str,
  capacity: int,
  parallel: ExpertParallel | None = None,
) -> Array:
  """The experts' output for routed tokens, through the `dispatch` implementation.

  Args:
    x_GxSxD: tokens in groups (rows), as the module docstring says.
    expert_index_GxSxK: each choice's global expert.
    combine_GxSxK: each choice's weight.
    wi_gate_ExDxF: every expert's gate projection (global arrays, as the other two).
    wi_up_ExDxF: every expert's up projection.
    wo_ExFxD: every expert's down projection.
    dispatch: a name in `REGISTRY`.
    capacity: slots per expert and group (`capacity`).
    parallel: None runs on the arrays as they are (one device); else `jax.shard_map` over the mesh set with
      `jax.set_mesh`, each device running its own experts (see `ExpertParallel`).

  Returns:
    out_GxSxD in x's dtype.
  """
  fn: Callable = REGISTRY[dispatch].fn
  num_experts = wi_gate_ExDxF.shape[0]
  if parallel is None:
    return fn(
      x_GxSxD,
      expert_index_GxSxK,
      combine_GxSxK,
      wi_gate_ExDxF,
      wi_up_ExDxF,
      wo_ExFxD,
      first_expert=0,
      num_experts=num_experts,
      capacity=capacity,
    )
  gather = tuple(axis for axis in parallel.expert_axes if axis in parallel.batch_axes)
  summed = tuple(axis for axis in parallel.expert_axes if axis not in gather) + parallel.mlp_axes

  def local(x, expert_index, combine, wi_gate, wi_up, wo):
    if gather:  # the tokens of the peers that hold other experts: every expert shard sees every token
      x, expert_index, combine = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, expert_index, combine))
    first = jax.lax.axis_index(parallel.expert_axes) * wi_gate.shape[0] if parallel.expert_axes else 0
    out = fn(
      x, expert_index, combine, wi_gate, wi_up, wo, first_expert=first, num_experts=num_experts, capacity=capacity
    )
    if gather:
      out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    return jax.lax.psum(out, summed) if summed else out

  rows = PartitionSpec(_spec_axis(parallel.batch_axes), None, None)
  expert, mlp = _spec_axis(parallel.expert_axes), _spec_axis(parallel.mlp_axes)
  in_specs = (rows, rows, rows, PartitionSpec(expert, None, mlp), PartitionSpec(expert, None, mlp))
  in_specs += (PartitionSpec(expert, mlp, None),)
  return jax.shard_map(local, in_specs=in_specs, out_specs=rows)(
    x_GxSxD, expert_index_GxSxK, combine_GxSxK, wi_gate_ExDxF, wi_up_ExDxF, wo_ExFxD
  )
