"""One `jaxlm train` per work directory, and a metrics log that never doubles back on resume.

The lock is an `fcntl.flock` held on `WORKDIR/.jaxlm.lock` for the life of
the run, with the holder's pid and host written inside. The kernel releases
a flock when its process dies, however it dies, so a lock whose file names a
process but can be taken is stale: it is taken over, and the takeover is
reported. A lock that cannot be taken names the live run holding it. Only
process 0 of a multi-process run takes it (the others share its work
directory). A `gs://` work directory is not locked: a bucket has no file
locks, and a lock object left by a preempted VM would block the relaunch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxlm.errors import JaxlmError
from jaxlm.storage import fs

LOCK_NAME = ".jaxlm.lock"


class LockError(JaxlmError, RuntimeError):
  """Another live run holds the work directory; the message names its pid and host."""


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return json.loads(os.read(fd, 4096).decode() or "{}")
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}


class WorkdirLock:
  """An exclusive lock on a work directory; `acquire()` then `release()`, or use it as a context manager."""

  def __init__(self, workdir: str | Path, report=print):
    """`report(message)` receives the one line said when a stale lock is taken over."""
    self.path = fs.path(workdir) / LOCK_NAME  # a gs:// URL stays one (see jaxlm/storage/fs.py)
    self.report = report
    self.fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises LockError naming the pid and host of the run that holds it."""
    if fs.is_url(self.path):  # see the module docstring
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise LockError(
          f"work directory {self.path.parent} is in use by another jaxlm train (pid {holder.get('pid', '?')} on "
          f"host {holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to finish, stop it, "
          "or pass another --workdir"
        ) from None
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
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    self.fd = fd

  def release(self) -> None:
    """Deletes the lock file and releases the lock (in that order, so no one locks a file about to vanish
    without noticing; see the inode check in `acquire`)."""
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
