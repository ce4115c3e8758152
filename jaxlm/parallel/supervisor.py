"""Multi-process `jaxlm train` runs in a child process, so that a lost peer ends in one line, not a C++ abort.

Why this exists: when a peer of a multi-process run dies, JAX's runtime
(jax 0.10) kills the survivors from C++ before any Python code can speak.
The coordination-service client calls LOG(FATAL) about 0.1 s after the
coordinator (process 0) disappears, and gloo aborts a CPU process whose peer
dies in the middle of a collective. Both print a C++ stack trace and end the
process by SIGABRT (status -6, or 134 in a shell). Nothing in the runtime
turns this into a Python-visible status: its `missed_heartbeat_callback`
cannot be a Python function (its absl::Status argument has no Python type,
so calling it raises std::bad_cast), and a Python thread probing the
coordinator cannot win a 0.1 s race. `jaxlm.parallel.watchdog` handles the slower
case, a silent peer while the coordinator lives.

So in multi-process runs `jaxlm train` re-executes itself as a child and
reads the child's stderr line by line, passing it through; stdout and stdin
are the child's own. Once the runtime's fatal report starts (a glog `F` line,
"Check failure stack trace", "terminate called ..."), the rest is withheld
and saved to WORKDIR/crash-<host>-<pid>.log, and the supervisor prints one
`jaxlm: error:` line naming the lost process where the report names it, then
exits 1. That is only for a child that dies of a signal (the runtime's abort):
one that exits with a status of its own (0, 143 or 75 after saving, 1 after its
own error line) gets its withheld lines shown and its status passed on, since
a line that merely looks fatal is no evidence against the status. The
runtime's glog lines (and the lines continuing them) are held back for a second, because such lines ("Polled an error from coordination
service") come just before the fatal one. SIGINT and SIGTERM are forwarded,
so the child's own exit statuses (130, 143, 75 after saving) come through
unchanged, and the child is killed when the supervisor dies, so killing
either one loses the process.
The progress bar is not drawn under the supervisor (the child's stderr is a
pipe); the plain per-step log lines are.

Joining the coordinator ends the same way when it times out (the runtime's
RegisterTask call aborts the process), so Python cannot retry it: the
supervisor starts the child again instead, up to
`distributed.initialization_attempts` times in all, since busy hosts have
failed to join in time spuriously.

Setting JAXLM_SUPERVISED=1 runs multi-process training without it.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError

_CHILD_MARK = "JAXLM_SUPERVISED"
_HOLD_S = 1.0  # how long a glog line waits for the fatal line that may follow it
_GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_FATAL_START = re.compile(
  r"^F\d{4} \d\d:\d\d:\d\d|Check failure stack trace|^terminate called |"
  r"^\*\*\* SIG[A-Z]+ received|^Fatal Python error: "
)
_JOIN_FAILED = re.compile(r"CoordinationService/RegisterTask")  # the runtime's client gave up joining
_COORDINATOR_LOST = re.compile(r"leader task|Failed to send RPC to coordination service")
_TASK = re.compile(r"/task:(\d+)|stopped sending heartbeats\):\s*(\d+)")
_STATUS = re.compile(r"\b[A-Z][A-Z_]{4,}: [^.\n]+")
_GLOO = re.compile(r"gloo|Connection (closed|reset) by peer|Received data size doesn't match")


class Launch(NamedTuple):
  """One process of a multi-process run: its id and the process count (-1 where JAX detects them), the
  run's workdir, where the runtime's crash report is saved, the coordinator's address ('' where JAX detects
  it) and how many times the process tries to join it (`distributed.initialization_attempts`)."""

  process_id: int
  num_processes: int
  workdir: str
  coordinator: str = ""
  attempts: int = 1


def environment_int(name: str, default: int, meaning: str) -> int:
  """The whole number in the environment variable `name` (`default` when unset or empty).

  Args:
    name: e.g. "JAX_NUM_PROCESSES".
    default: the value when the variable is unset or empty.
    meaning: what the number is, for the error message (e.g. "the number of processes").

  Returns:
    The number.

  Raises:
    ConfigError: the variable holds something else; one line naming it.
  """
  text = os.environ.get(name, "").strip()
  if not text:
    return default
  try:
    return int(text)
  except ValueError:
    raise ConfigError(
      f"environment variable {name}={text[:40]!r} is not a whole number; set it to {meaning}, or unset it"
    ) from None


def num_processes_of(distributed) -> int:
  """The process count of a `distributed` config section: its num_processes, else JAX_NUM_PROCESSES, else 0."""
  return distributed.num_processes or environment_int("JAX_NUM_PROCESSES", 0, "the number of processes")


def process_id_of(distributed) -> int:
  """The process id of a `distributed` config section: its process_id, else JAX_PROCESS_ID, else -1."""
  if distributed.process_id >= 0:
    return distributed.process_id
  return environment_int("JAX_PROCESS_ID", -1, "this process's number (0 for the first)")


def lost_line(lost: str, process_id: int, num_processes: int) -> str:
  """The one `jaxlm: error:` line of a process that stops because `lost` (e.g. 'lost process 1: ...') happened."""
  me = f"process {process_id} of {num_processes}" if process_id >= 0 and num_processes > 0 else "this process"
  return f"jaxlm: error: {lost}; {me} stops. Restart all processes: training resumes from the last intact checkpoint."


def launch_of(config_path: str, overrides: list[str], workdir: str) -> Launch | None:
  """The Launch of `jaxlm train --config config_path` with `overrides` when it is one process of several and
  not already supervised; else None (also for a config that does not load: the unsupervised run reports it)."""
  if os.environ.get(_CHILD_MARK):
    return None
  try:
    distributed = config_lib.apply_overrides(config_lib.load_config_file(config_path), overrides).distributed
    num_processes = num_processes_of(distributed)
    process_id = process_id_of(distributed)
    coordinator = distributed.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  except Exception:  # noqa: BLE001 - any config failure is reported by the run itself
    return None
  if num_processes in (0, 1):
    return None
  return Launch(process_id, num_processes, workdir, coordinator, distributed.initialization_attempts)


def _die_with_parent() -> None:
  """In the child, before exec: the kernel sends it SIGKILL when the supervisor dies (Linux's PR_SET_PDEATHSIG),
  so that killing the supervisor loses the process, as killing an unsupervised run does."""
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _detail(report: str) -> str:
  """The status the runtime's fatal `report` ends with, e.g. 'UNAVAILABLE: Failed to send RPC to coordination
  service' (else its first fatal line)."""
  lines = report.splitlines()
  fatal = lines[next((i for i, line in enumerate(lines) if _FATAL_START.search(line)), 0) :]
  status = _STATUS.search("\n".join(fatal))
  return (status.group(0) if status else re.sub(r"^F\d{4} [^\]]*\] ", "", fatal[0].strip()))[:160]


def _lost_peer(report: str, launch: Launch) -> str:
  """What the runtime's fatal `report` says was lost, for `lost_line`."""
  lines, detail = report.splitlines(), _detail(report)
  if _JOIN_FAILED.search(report):
    return (
      f"could not join the coordinator{f' at {launch.coordinator}' if launch.coordinator else ''} in "
      f"{launch.attempts} attempt(s) ({detail}); check that every process was started, or raise "
      "distributed.initialization_timeout_s"
    )
  if launch.process_id != 0 and _COORDINATOR_LOST.search(report):
    return f"lost the coordinator (process 0): {detail}"
  others = {int(task or listed) for task, listed in _TASK.findall(report)} - {launch.process_id}
  if len(others) == 1:
    return f"lost process {others.pop()}: the runtime reported its failure ({detail})"
  if _GLOO.search(report):
    peer = f"process {1 - launch.process_id}" if launch.num_processes == 2 and launch.process_id >= 0 else "a peer"
    said = [line for line in lines if _GLOO.search(line) and not _FATAL_START.search(line)]  # e.g. what():
    gloo = re.sub(r"^\s*what\(\):\s*|\[enforce fail at [^\]]*\]\s*", "", said[-1] if said else detail)[:160]
    return f"lost {peer} in the middle of a collective (gloo: {gloo})"
  return f"the training process ended in a runtime error ({detail})"


def _crash_log_path(workdir: str) -> str:
  """WORKDIR/crash-<host>-<pid>.log for a local workdir; the temporary folder's for a gs:// one."""
  folder = tempfile.gettempdir() if "://" in workdir else workdir
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"crash-{socket.gethostname()}-{os.getpid()}.log")


def run(command: list[str], launch: Launch) -> int:
  """Runs `command` (e.g. `python -m jaxlm train ...`) as a child, as the module docstring says; returns
  the exit status for this process: the child's own, or 1 after the one line of a runtime abort."""
  forwarded, children = [], []

  def forward(signum, frame):
    forwarded.append(signum)
    for child in children:
      child.send_signal(signum)

  # Installed before the child starts: a signal that comes while it starts is then passed on, not lost.
  previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    attempt = 1
    while True:
      children[:] = [
        subprocess.Popen(
          command,
          stderr=subprocess.PIPE,
          env=dict(os.environ, **{_CHILD_MARK: "1"}),
          preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
      ]
      for signum in forwarded:
        children[0].send_signal(signum)
      status = _supervise(children[0], launch, forwarded, may_retry=attempt < launch.attempts)
      if status is not None:
        return status
      attempt += 1
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _supervise(child: subprocess.Popen, launch: Launch, forwarded: list[int], may_retry: bool) -> int | None:
  """Passes the child's stderr through until it exits, withholding a fatal report; returns the exit status, or
  None when the child could not join the coordinator and `may_retry` (busy hosts have failed it spuriously)."""
  shown = collections.deque(maxlen=200)  # the last lines passed through, as context in the crash log
  held: list[tuple[float, bytes]] = []  # glog lines waiting to see whether a fatal report follows
  report: list[bytes] | None = None  # the withheld fatal report, once it started
  reported = False  # the child printed its own `jaxlm: error:` line
  partial = b""

  def show(line: bytes) -> None:
    nonlocal reported
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()
    shown.append(line)
    reported = reported or b"jaxlm: error:" in line

  def take(line: bytes) -> None:
    nonlocal report, held
    text = line.decode(errors="replace")
    if report is not None:
      report.append(line)
    elif _FATAL_START.search(text):
      report, held = [line for _, line in held] + [line], []
    elif held or _GLOG_LINE.match(text):  # a glog line, or one continuing it (the runtime's messages span lines)
      held.append((time.monotonic(), line))
    else:
      show(line)

  stream = child.stderr.fileno()
  while True:
    readable, _, _ = select.select([stream], [], [], _HOLD_S / 4)
    chunk = os.read(stream, 65536) if readable else None
    if chunk == b"":
      break
    lines = (partial + (chunk or b"")).split(b"\n")
    partial = lines.pop()
    for line in lines:
      take(line + b"\n")
    if held and time.monotonic() - held[0][0] > _HOLD_S:
      for _, waiting in held:
        show(waiting)
      held = []
  if partial:
    take(partial)
  for _, waiting in held:
    show(waiting)
  status = child.wait()

  if status >= 0 or -status in forwarded:
    # The exit status wins over lines that only look fatal: the child ended on its own (success, a stop after
    # saving, one line of its own), or of the signal the user sent, before installing its handler.
    for line in report or []:
      show(line)
    return status if status >= 0 else 128 - status
  if report is None:
    lost = f"the training process was killed by {signal.Signals(-status).name}"
  else:
    text = b"".join(report).decode(errors="replace")
    if may_retry and not forwarded and _JOIN_FAILED.search(text):
      sys.stderr.write(f"jaxlm: could not join the coordinator ({_detail(text)}); trying again\n")
      return None
    log_path = _crash_log_path(launch.workdir)
    with open(log_path, "wb") as log:
      log.write(b"".join(shown) + b"".join(report))
    lost = f"{_lost_peer(text, launch)}; the runtime's report is in {log_path}"
  if not reported:  # else the child's own line named the cause already
    sys.stderr.write(lost_line(lost, launch.process_id, launch.num_processes) + "\n")
  return 1
