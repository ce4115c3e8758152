"""The device mesh, logical-to-mesh sharding, and process-local to global batches.

Sharding is declared once, by logical axis name on every parameter (see
`jaxlm.layers`); the config's rules table maps those names onto the mesh axes
`data`, `fsdp` and `tensor`. State shardings are derived from `jax.eval_shape`
of the initializer, so nothing is allocated before its placement is known.
"""

from __future__ import annotations

import contextlib
import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import watchdog

AXES = ("data", "fsdp", "tensor")


class DistributedError(RuntimeError):
  """Processes that cannot start together; the message names the coordinator and the timeout."""


def maybe_initialize_distributed(config) -> None:
  """Calls `jax.distributed.initialize` when more than one process is configured.

  num_processes > 1 launches by hand: the coordinator and process id come
  from the config or from JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID.
  num_processes = -1 lets JAX detect the cluster itself (TPU VMs, SLURM).
  The timeouts come from `config.distributed`. Initialization is retried
  (busy hosts have failed it spuriously), and `jaxlm.watchdog` makes every
  process exit with one line naming a peer that stops responding.
  """
  d = config.distributed
  num_processes = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if num_processes == -1:
    jax.distributed.initialize(initialization_timeout=d.initialization_timeout_s,
                               heartbeat_timeout_seconds=watchdog.runtime_heartbeat_timeout(d.heartbeat_timeout_s))
    watchdog.start(d.heartbeat_timeout_s)
    return
  if num_processes <= 1:
    return
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  process_id = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if not address or process_id < 0:
    raise config_lib.ConfigError(
        "distributed.num_processes > 1 needs distributed.coordinator_address and distributed.process_id "
        "(or JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID)")
  for attempt in range(1, d.initialization_attempts + 1):
    try:
      jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id,
                                 initialization_timeout=d.initialization_timeout_s,
                                 heartbeat_timeout_seconds=watchdog.runtime_heartbeat_timeout(d.heartbeat_timeout_s))
      watchdog.start(d.heartbeat_timeout_s)
      return
    except Exception as e:  # noqa: BLE001 - the runtime reports timeouts as several exception types
      with contextlib.suppress(Exception):  # a half-made client blocks the next attempt
        jax.distributed.shutdown()
      if attempt == d.initialization_attempts:
        raise DistributedError(
            f"process {process_id} of {num_processes} could not join the coordinator at {address} in "
            f"{d.initialization_attempts} attempt(s) of {d.initialization_timeout_s} s "
            f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}); check that every "
            "process was started, or raise distributed.initialization_timeout_s") from None
      time.sleep(min(2 ** attempt, 10))


def make_mesh(config) -> Mesh:
  """The Mesh with axes ('data', 'fsdp', 'tensor') the whole `config` asks for (`config.mesh`), on all devices."""
  sizes = config_lib.mesh_shape(config, jax.device_count())
  # Devices sorted by process keep each process's devices contiguous along the
  # data axes, which is how `jaxlm.data.local_rows` lays out the batch.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices).reshape([sizes[a] for a in AXES]), AXES)


def logical_shardings(mesh: Mesh, rules, abstract_boxed):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) abstract values."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, abstract_state, param_shardings):
  """Shardings for a TrainState: params as given, optimizer moments like their params."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  return abstract_state.replace(step=replicated, params=param_shardings, opt_state=opt_shardings)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, spec)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the data axes."""
  return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local_batch.items()}
