"""One `jaxlm train` per work directory, and a metrics log that never doubles back on resume.

On a local disk the lock is an `fcntl.flock` held on `WORKDIR/.jaxlm.lock`
for the life of the run, with the holder's pid and host written inside. The
kernel releases a flock when its process dies, however it dies, so a lock
whose file names a process but can be taken is stale: it is taken over, and
the takeover is reported.

In a bucket, which has no file locks, the lock is the object
`WORKDIR/.jaxlm.lock`, created only if absent (a generation-match
precondition makes that atomic) and rewritten every `HEARTBEAT_S` seconds
by its holder. A lock object is stale when its heartbeat is older than
`STALE_AFTER_S` (a preempted VM beats no more), or when it names a process
of this host that no longer exists (a run killed here). A stale lock is
taken over by replacing that very generation, so of two runs taking it over
at once one wins. A holder whose lock was taken over (its heartbeat stopped
for longer than `STALE_AFTER_S`) learns it at its next heartbeat and stops
before its next save (`check`).

Either way, a lock that cannot be taken names the live run holding it. Only
process 0 of a multi-process run takes it (the others share its work
directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from jaxlm.errors import JaxlmError
from jaxlm.storage import fs

LOCK_NAME = ".jaxlm.lock"
HEARTBEAT_S = 30.0  # how often the holder of a bucket lock rewrites it
STALE_AFTER_S = 150.0  # a bucket lock not rewritten for this long belongs to a run that is gone


class LockError(JaxlmError, RuntimeError):
  """Another live run holds the work directory; the message names its pid and host."""


def _parse_holder(data: bytes) -> dict:
  try:
    holder = json.loads(data.decode() or "{}")
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  return _parse_holder(os.read(fd, 4096))


def _in_use(workdir, holder: dict) -> LockError:
  return LockError(
    f"work directory {workdir} is in use by another jaxlm train (pid {holder.get('pid', '?')} on "
    f"host {holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to finish, stop it, "
    "or pass another --workdir"
  )


def _process_gone(holder: dict) -> bool:
  """True when `holder` names a process of this host that does not exist."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return True
  except OSError:  # it exists, under another user
    return False
  return False


def stale_reason(holder: dict, now: float | None = None) -> str | None:
  """Why the bucket lock record `holder` belongs to no live run, or None when its run may still be alive.

  Args:
    holder: the lock object's record ({'pid', 'host', 'since', 'heartbeat'}); {} when it was unreadable.
    now: the current time (time.time()); default now.

  Returns:
    A clause for the takeover message, or None.
  """
  if not isinstance(holder.get("heartbeat"), (int, float)):
    return "its lock object is unreadable"
  age = (time.time() if now is None else now) - holder["heartbeat"]
  if age > STALE_AFTER_S:
    return f"its last heartbeat was {age:.0f} s ago"
  if _process_gone(holder):
    return "that process no longer exists"
  return None


class WorkdirLock:
  """An exclusive lock on a work directory; `acquire()` then `release()`, or use it as a context manager."""

  def __init__(self, workdir: str | Path, report=print):
    """`report(message)` receives the one line said when a stale lock is taken over."""
    self.path = fs.path(workdir) / LOCK_NAME  # a gs:// URL stays one (see jaxlm/storage/fs.py)
    self.report = report
    self.fd: int | None = None
    self.generation: int | None = None  # of the bucket lock object this run wrote last
    self.lost: dict | None = None  # the record of the run that took the bucket lock over
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises LockError naming the pid and host of the run that holds it."""
    if fs.is_url(self.path):
      self._acquire_object()
      return
    try:
      self._acquire_file()
    except OSError as e:  # e.g. the lock's name is taken by a folder, or the folder is read-only
      raise LockError(
        f"cannot take the lock {self.path} ({e.strerror}); remove or rename it if it is not jaxlm's lock file, "
        "or pass another --workdir"
      ) from None

  def _acquire_file(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise _in_use(self.path.parent, holder) from None
      # A holder that released and deleted the file meanwhile leaves us locking an unlinked inode: retry.
      if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
        os.close(fd)
        continue
      break
    previous = _read_holder(fd)
    if previous.get("pid"):
      self.report(
        f"taking over the stale lock of pid {previous['pid']} on host {previous.get('host', '?')} "
        f"({self.path}); that run ended without releasing it"
      )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(self._record()).encode())
    os.fsync(fd)
    self.fd = fd

  def _record(self) -> dict:
    if not hasattr(self, "_me"):
      self._me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
      self._me["token"] = uuid.uuid4().hex  # tells this run's writes from another's
    return {**self._me, "heartbeat": time.time()}

  def _acquire_object(self) -> None:
    for _ in range(5):  # each retry follows another run's change to the object: a handful settles it
      try:
        self.generation = fs.write_object_if(self.path, json.dumps(self._record()).encode(), 0)
        break
      except FileExistsError:
        found = fs.read_object(self.path)
      if found is None:  # released meanwhile
        continue
      holder, generation = _parse_holder(found[0]), found[1]
      if holder.get("token") == self._me["token"]:  # our create landed, and its answer was lost and retried
        self.generation = generation
        break
      reason = stale_reason(holder)
      if reason is None:
        raise _in_use(self.path.parent, holder)
      try:
        self.generation = fs.write_object_if(self.path, json.dumps(self._record()).encode(), generation)
      except FileExistsError:
        continue  # another run changed it first: look again
      self.report(
        f"taking over the stale lock of pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"({self.path}): {reason}"
      )
      break
    else:
      raise LockError(f"cannot take the lock {self.path}: other runs keep changing it; pass another --workdir")
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name="jaxlm-lock-heartbeat", daemon=True)
    self._heartbeat.start()

  def _beat(self) -> None:
    """Rewrites the bucket lock every HEARTBEAT_S seconds while the run holds it."""
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self.generation = fs.write_object_if(self.path, json.dumps(self._record()).encode(), self.generation)
      except FileExistsError:  # taken over: this run stops before its next save (`check`)
        found = fs.read_object(self.path)
        self.lost = _parse_holder(found[0]) if found else {}
        return
      except Exception:  # noqa: BLE001 - an unreachable bucket: the run's own writes report it; beat again later
        continue

  def check(self) -> None:
    """Raises LockError when another run took this run's bucket lock over (its heartbeat had stopped)."""
    if self.lost is not None:
      raise LockError(
        f"the lock {self.path} was taken over by pid {self.lost.get('pid', '?')} on host "
        f"{self.lost.get('host', '?')} while this run's heartbeat had stopped; stopped before saving, so as not to "
        "write into that run's checkpoints"
      )

  def release(self) -> None:
    """Gives the lock up: deletes the lock file (or object) and, on a local disk, releases the flock (in that
    order, so no one locks a file about to vanish without noticing; see the inode check in `_acquire_file`)."""
    if self._heartbeat is not None:
      self._stop.set()
      self._heartbeat.join()
      self._heartbeat = None
      if self.lost is None:
        # Only our own generation: a lock taken over meanwhile stays. Bounded: an unreachable bucket is being
        # reported already, and a lock left behind goes stale.
        worker = threading.Thread(target=_quietly, args=(fs.delete_object_if, self.path, self.generation), daemon=True)
        worker.start()
        worker.join(10.0)
      return
    if self.fd is None:
      return
    self.path.unlink(missing_ok=True)
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)
    self.fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _quietly(function, *args) -> None:
  with contextlib.suppress(Exception):
    function(*args)


def holder(workdir: str | Path) -> dict | None:
  """The record of the live run that holds `workdir`'s lock, or None when no live run holds it.

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    {'pid', 'host', 'since', ...} of the holder, or None.
  """
  path = fs.path(workdir) / LOCK_NAME
  if fs.is_url(path):
    found = fs.read_object(path)
    if found is None:
      return None
    record = _parse_holder(found[0])
    return None if stale_reason(record) else record
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _read_holder(fd)
  finally:
    os.close(fd)
  return None


def drop_metrics_after(workdir: str | Path, step: int) -> int:
  """Moves metrics.jsonl rows logged after `step` (by a run that went further than its last intact
  checkpoint) to metrics.rolled_back.jsonl, so a resumed run's rows do not double back; returns how many.

  Call it on process 0 before opening the metrics writer. Nothing is deleted: the moved rows are appended to
  the rolled-back file with the step they were rolled back to.
  """
  path = fs.path(workdir) / "metrics.jsonl"  # local or gs://
  if not path.is_file():
    return 0
  kept, dropped = [], []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill: not a row of either run
      dropped.append(json.dumps({"unparsed": line}))
      continue
    (dropped if row.get("step", 0) > step else kept).append(line)
  if not dropped:
    return 0
  rolled_back = fs.AppendFile(fs.join(workdir, "metrics.rolled_back.jsonl"))
  for line in dropped:
    rolled_back.write(json.dumps({"rolled_back_to": step, **json.loads(line)}) + "\n")
  rolled_back.close()
  if fs.is_url(path):  # a bucket replaces whole objects: no temporary needed
    path.write_text("".join(line + "\n" for line in kept))
    return len(dropped)
  temporary = path.with_suffix(".jsonl.tmp")
  temporary.write_text("".join(line + "\n" for line in kept))
  os.replace(temporary, path)
  return len(dropped)
