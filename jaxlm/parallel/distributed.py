"""Starting the processes of a multi-process run together: `jax.distributed` with retries and a watchdog."""

from __future__ import annotations

import contextlib
import os
import time

import jax

from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.parallel import watchdog


class DistributedError(JaxlmError, RuntimeError):
  """Processes that cannot start together; the message names the coordinator and the timeout."""


def maybe_initialize_distributed(config) -> None:
  """Calls `jax.distributed.initialize` when more than one process is configured.

  num_processes > 1 launches by hand: the coordinator and process id come
  from the config or from JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID.
  num_processes = -1 lets JAX detect the cluster itself (TPU VMs, SLURM).
  The timeouts come from `config.distributed`. Initialization is retried
  (busy hosts have failed it spuriously): here when it raises, and by
  `jaxlm.parallel.supervisor` (under `jaxlm train`) when joining times out, which
  JAX's runtime turns into a C++ abort. `jaxlm.parallel.watchdog` makes every
  process exit with one line naming a peer that stops responding.

  Args:
    config: the whole config; its `distributed` section.

  Raises:
    ConfigError: a hand launch without a coordinator address or process id.
    DistributedError: the process could not join the coordinator in the attempts allowed.
  """
  d = config.distributed
  num_processes = d.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if num_processes == -1:
    jax.distributed.initialize(
      initialization_timeout=d.initialization_timeout_s,
      heartbeat_timeout_seconds=watchdog.runtime_heartbeat_timeout(d.heartbeat_timeout_s),
    )
    watchdog.start(d.heartbeat_timeout_s)
    return
  if num_processes <= 1:
    return
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  process_id = d.process_id if d.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if not address or process_id < 0:
    raise ConfigError(
      "distributed.num_processes > 1 needs distributed.coordinator_address and distributed.process_id "
      "(or JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID)"
    )
  for attempt in range(1, d.initialization_attempts + 1):
    try:
      jax.distributed.initialize(
        address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=d.initialization_timeout_s,
        heartbeat_timeout_seconds=watchdog.runtime_heartbeat_timeout(d.heartbeat_timeout_s),
      )
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
          "process was started, or raise distributed.initialization_timeout_s"
        ) from None
      time.sleep(min(2**attempt, 10))
