"""Logical-to-mesh sharding, process-local to global batches, and what one device can hold.

Sharding is declared once, by logical axis name on every parameter (see
`jaxlm.models.layers`); the config's rules table maps those names onto the mesh axes
`data`, `fsdp` and `tensor` (`jaxlm.parallel.mesh`). State shardings are derived from `jax.eval_shape`
of the initializer, so nothing is allocated before its placement is known.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib


def check_divisible(abstract_tree, sharding_tree, flag: str) -> None:
  """ConfigError naming the first array whose sharded dimension the mesh does not divide (else XLA's or
  Orbax's traceback); `flag` names what sets the mesh sizes (e.g. '--mesh')."""

  def check(path, abstract, sharding):
    for size, axes in zip(abstract.shape, sharding.spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(sharding.mesh.shape[a] for a in names)
      if size % ways:
        raise config_lib.ConfigError(
          f"{jax.tree_util.keystr(path)} has a dimension of {size}, which mesh axes {'x'.join(names)} "
          f"({ways} ways) do not divide; choose {flag} sizes that divide the model's dimensions "
          "(or map the axis to None in mesh.rules)"
        )

  jax.tree_util.tree_map_with_path(check, abstract_tree, sharding_tree)


def logical_shardings(mesh: Mesh, rules, abstract_boxed):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) abstract values."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, abstract_state, param_shardings):
  """Shardings for a TrainState: params as given, optimizer moments like their params."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_state.opt_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
  return abstract_state.replace(step=replicated, params=param_shardings, opt_state=opt_shardings)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """The sharding of a [batch, length] array: rows split by the logical rules for 'batch'."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, spec)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the data axes."""
  return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local_batch.items()}


def available_bytes(device) -> tuple[int, str]:
  """(bytes one device can hold, where that figure comes from) for a `jax.Device`: the accelerator's
  `memory_stats()['bytes_limit']`, or for CPU devices (no memory stats) the host's available memory shared
  by this process's devices."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.platform} memory"
  return _host_available_bytes() // max(jax.local_device_count(), 1), "available host memory per CPU device"


def _host_available_bytes() -> int:
  """The kernel's MemAvailable: free memory plus the page cache it can reclaim. Free pages alone (sysconf's
  SC_AVPHYS_PAGES, the fallback where /proc is missing) leave out that cache, often most of a busy host's
  memory, and would refuse steps that fit."""
  try:
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def shard_bytes(abstract_tree, sharding_tree) -> int:
  """Bytes one device holds of a tree of abstract arrays (`jax.ShapeDtypeStruct`s) under the matching tree
  of Shardings."""
  leaves = jax.tree.leaves(abstract_tree)
  sharding_leaves = jax.tree.leaves(sharding_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, sharding_leaves))


def check_state_fits(abstract_state, shardings, params) -> None:
  """Raises ConfigError, before anything is traced or compiled, when the train state cannot fit a device.

  abstract_state / shardings: the TrainState's `jax.ShapeDtypeStruct` tree and its NamedShardings;
  params: the params subtree of `abstract_state`, counted once more for the gradients. This is a lower
  bound on what the step needs (activations come on top), so a config it refuses can never run. It is the
  cheap first guard: `jaxlm.training.memory` then checks XLA's estimate of the whole compiled step.
  """
  needed = shard_bytes(abstract_state, shardings) + shard_bytes(params, shardings.params)
  available, source = available_bytes(jax.local_devices()[0])
  if needed > available:
    gib = 1024**3
    raise config_lib.ConfigError(
      f"the train state alone needs {needed / gib:.1f} GiB per device (parameters, optimizer state and "
      f"gradients) but the {source} is {available / gib:.1f} GiB; lower model.max_len, model.d_model, "
      "model.num_layers or model.vocab_size, or shard it with --config.mesh.fsdp=N"
    )
