"""Peer liveness for multi-process runs: a lost process is named in one line, and the others exit with status 1.

JAX's runtime detects a dead peer by missed heartbeats too, but then aborts
every process with a C++ stack trace (exit -6), and its callback for that
case cannot be used from Python in jax 0.10 (the status it passes has no
Python type). So each process runs this daemon thread: it bumps a counter
under `jaxlm/alive/<process>` in the coordination service's key-value store
every `timeout / 5` seconds and reads the others'. A counter that stops
moving for `timeout` seconds names its process; a key-value store that stops
answering means the coordinator (process 0) is gone. The runtime's own
heartbeat timeout is set well above ours (`runtime_heartbeat_timeout`), so
this thread speaks first. The runtime's faster aborts (the coordinator gone,
a peer lost inside a gloo collective) are turned into one line by
`jaxlm.parallel.supervisor`, which runs `jaxlm train` in a child process.

Counters, not clock times, are compared, so clocks of different hosts need
not agree. A process that finishes cleanly marks itself done first
(`atexit`, which runs before JAX's own shutdown), so its peers never take a
normal exit for a loss.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax

from jaxlm.parallel import supervisor

_PREFIX = "jaxlm/alive/"
_DONE = "jaxlm/done/"
_running: "_Watchdog | None" = None  # this process's watchdog, once started


def runtime_heartbeat_timeout(timeout_s: int) -> int:
  """The heartbeat timeout to give JAX's runtime: long enough that the watchdog's `timeout_s` fires first."""
  return 3 * timeout_s + 30


def _client():
  from jax._src import distributed as jax_distributed  # private: JAX has no public handle on its client

  return jax_distributed.global_state.client


def _lost(message: str) -> None:
  sys.stderr.write(supervisor.lost_line(message, jax.process_index(), jax.process_count()) + "\n")
  sys.stderr.flush()
  os._exit(1)  # other threads may be blocked in a collective that will never finish


class _Watchdog(threading.Thread):
  def __init__(self, timeout_s: float):
    super().__init__(name="jaxlm-watchdog", daemon=True)
    self.timeout_s = timeout_s
    self.interval_s = max(timeout_s / 5, 0.5)
    self.stopping = threading.Event()
    self.last_seen: dict[str, tuple[str, float]] = {}  # key -> (counter, local time it last changed)
    self.done: set[str] = set()  # the processes that finished cleanly

  def run(self) -> None:
    client, me, count = _client(), jax.process_index(), 0
    last_seen = self.last_seen
    unreachable_since = None
    while not self.stopping.wait(self.interval_s):
      count += 1
      try:
        client.key_value_set(f"{_PREFIX}{me}", str(count), allow_overwrite=True)
        alive = dict(client.key_value_dir_get(_PREFIX))
        done = self.done = {key.rsplit("/", 1)[-1] for key, _ in client.key_value_dir_get(_DONE)}
      except Exception as e:  # noqa: BLE001 - any failure to reach the store
        if self.stopping.is_set():
          return
        unreachable_since = unreachable_since or time.monotonic()
        if time.monotonic() - unreachable_since > min(self.timeout_s, 10):
          _lost(
            f"lost the coordinator (process 0): its key-value store stopped answering "
            f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})"
          )
        continue
      unreachable_since = None
      now = time.monotonic()
      for key, value in alive.items():
        process = key.rsplit("/", 1)[-1]
        if process == str(me) or process in done:
          continue
        if last_seen.get(key, (None,))[0] != value:
          last_seen[key] = (value, now)
        elif now - last_seen[key][1] > self.timeout_s:
          _lost(f"lost process {process}: no sign of life for {self.timeout_s:g} s (distributed.heartbeat_timeout_s)")

  def stop(self) -> None:
    self.stopping.set()
    try:
      _client().key_value_set(f"{_DONE}{jax.process_index()}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the store may be gone already; the peers then stop anyway
      pass

  def wait_for_verdict(self) -> None:
    """Returns once every peer still running moved its counter after the call (all alive); a lost one ends the
    process first (`run`), within `timeout_s` of its last sign of life."""
    before = dict(self.last_seen)
    deadline = time.monotonic() + self.timeout_s + 3 * self.interval_s
    while time.monotonic() < deadline and not self.stopping.is_set():
      seen = dict(self.last_seen)
      running = [key for key in seen if key.rsplit("/", 1)[-1] not in self.done]
      if all(seen[key][0] != before.get(key, (None,))[0] for key in running):
        return
      time.sleep(self.interval_s / 4)


def start(timeout_s: float) -> None:
  """Starts watching the other processes (after `jax.distributed.initialize`); stops at interpreter exit."""
  global _running
  if jax.process_count() <= 1:
    return
  _running = _Watchdog(timeout_s)
  _running.start()
  atexit.register(_running.stop)


def name_a_lost_peer() -> None:
  """After a failure that a lost peer can cause (a collective that broke): waits until the watchdog knows whether
  a peer is lost, at most `distributed.heartbeat_timeout_s` and a little. A lost peer (or coordinator) is then named
  in one line and the process exits with status 1, as when the watchdog finds it between steps; with every peer
  alive, or no watchdog running, this returns and the failure is reported as it is."""
  if _running is not None and _running.is_alive():
    _running.wait_for_verdict()
