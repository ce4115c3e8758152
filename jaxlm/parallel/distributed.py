"""Starting the processes of a multi-process run together: `jax.distributed` with retries and a watchdog."""

from __future__ import annotations

import contextlib
import os
import time

import jax
from jax.experimental import multihost_utils

from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.parallel import supervisor, watchdog


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
    ConfigError: a hand launch without a coordinator address or process id, or JAX_NUM_PROCESSES or
      JAX_PROCESS_ID that is not a whole number.
    DistributedError: the process could not join the coordinator in the attempts allowed.
  """
  d = config.distributed
  num_processes = supervisor.num_processes_of(d)
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
  process_id = supervisor.process_id_of(d)
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


def name_a_lost_peer() -> None:
  """Before a multi-process run reports a failure: when a lost peer caused it (a collective or a save that broke
  because a process died), names that process in one line and exits with status 1, as when the watchdog finds it
  between steps (see `watchdog.name_a_lost_peer`; waits at most `distributed.heartbeat_timeout_s` and a little).
  Returns at once in a one-process run."""
  watchdog.name_a_lost_peer()


def preemption_service_on() -> bool:
  """Whether JAX's preemption service runs in this process: a multi-process run (after `jax.distributed.initialize`)
  with jax_enable_preemption_service on. Its handler then owns SIGTERM, from start-up on."""
  from jax._src import distributed as jax_distributed  # private: JAX has no public handle on its sync manager

  return jax.process_count() > 1 and jax_distributed.global_state.preemption_sync_manager is not None


def reached_stop_point(steps_run: int) -> bool:
  """Whether every process should save and stop after its `steps_run`-th step: a preemption notice (SIGTERM)
  reached some process, and `steps_run` is the step after the furthest process's when the notice spread. Call it
  after every step with the same count in every process (0 before the first), as the preemption service needs.

  Args:
    steps_run: steps run so far, counted from a point all processes share.

  Returns:
    True at the agreed step, in every process alike.
  """
  return multihost_utils.reached_preemption_sync_point(steps_run)
