"""Orbax checkpoints: async saves, keep-last-K, verified restores onto any mesh.

A checkpoint holds two items: `state` (step, params, optimizer state) and
`meta` (the resolved config, the data position, `integrity`: each array's
shape, dtype and checksum from `jaxlm.storage.integrity`, and `run_id`: the
id of the run that wrote it, from `jaxlm.storage.run_id`). Restores always pass
target shardings built for the current mesh, because Orbax otherwise tries
the saved topology and fails or runs out of memory on another device count.

Every restore is verified. A step counts as damaged when a commit marker is
missing (an incomplete save), when Orbax cannot read it (a truncated or
deleted file), when an array's checksum differs from the one recorded at
save time, or when it records another run's id than the run directory holding
it (a step folder copied in from another run is self-consistent, yet not
this run's). Damage is named (step, array or file, what is wrong) in one line
that also names the intact steps; `train` falls back to the newest intact
step and moves the damaged ones aside, so nothing is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import JaxlmError
from jaxlm.storage import fs, integrity, run_id

# Written by Orbax 0.12 when a save commits (the step folder is renamed into place after them).
COMMIT_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt", "state/commit_success.txt", "meta/commit_success.txt")
# Files every complete step holds besides the array data: the state's tree structure and the OCDBT root.
STRUCTURE_FILES = ("state/_METADATA", "state/manifest.ocdbt", "meta/metadata")
SAVE_PROBE_S = 20.0  # a save into a bucket running this long: ask whether the bucket still answers, as often
_STATUS = re.compile(r"\b[A-Z][A-Z_]{4,}: ")  # TensorStore's status prefix, e.g. 'OUT_OF_RANGE: '


class CheckpointError(JaxlmError, RuntimeError):
  """A checkpoint that cannot be used or written; the message is one line naming the step or path."""


class SaveAbandonedError(CheckpointError):
  """A save into a bucket given up because the bucket stopped answering.

  Orbax's writer threads (not daemon threads) still wait on that save and would hold the interpreter's exit
  until Orbax's own 600 s timeout, so a process that reports this error should end with `os._exit` after
  flushing its output, as the `jaxlm` command does. Nothing is lost: the steps saved before it are complete.
  """

  holds_threads = True


class _Damaged(Exception):
  """Internal: a step failed verification; the message says where and how."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def _read_error_text(error: BaseException) -> str:
  """The informative line of a failed read: TensorStore's status message (with the file it names) if the
  exception chain holds one, without the multi-kilobyte spec Orbax appends."""
  chain, current = [], error
  while current is not None and len(chain) < 10:
    chain.append(current)
    current = current.__cause__ or current.__context__
  text = next((str(e) for e in chain if _STATUS.search(str(e))), str(chain[-1]))
  match = _STATUS.search(text)
  text = text[match.start() :] if match else text
  text = re.sub(r" \[(tensorstore_spec|source locations)=.*", "", text.strip().splitlines()[0])
  # The cause (e.g. 'No space left on device') comes last: keep both ends of a long message.
  return text if len(text) <= 400 else f"{text[:220]} ... {text[-170:]}"


# What TensorStore's callbacks report when they complete after Orbax gave up on the operation.
_LATE_CALLBACK_ERRORS = ("Event loop is closed", "sys.meta_path is None, Python is likely shutting down")


def _ignore_reads_finishing_after_a_failure() -> None:
  """Drops the reports of reads and writes still in flight when a restore or save failed.

  Orbax runs each operation in a fresh event loop and closes it when the first
  read or write fails; TensorStore then completes the others and their
  callbacks hit the closed loop (or a shutting-down interpreter), each printing
  a traceback through `sys.unraisablehook`. Only those exact errors are
  dropped; the hook is chained, and installed once, by the first Checkpointer
  (never on import), since the reports can come before the failure reaches
  this module.
  """
  previous = sys.unraisablehook
  if getattr(previous, "jaxlm_closed_loop_filter", False):
    return

  def hook(unraisable):
    if str(unraisable.exc_value) in _LATE_CALLBACK_ERRORS:
      return
    previous(unraisable)

  hook.jaxlm_closed_loop_filter = True
  sys.unraisablehook = hook


def _abspath(directory) -> Path:
  return fs.absolute(directory)  # a gs:// URL stays one (pathlib would fold it to gs:/)


def last_good_sentence(step: int | None) -> str:
  """A sentence naming the newest checkpoint that is safe to resume from (`step`, None if there is none)."""
  if step is None:
    return "No checkpoint has been saved yet, so a rerun starts from scratch."
  return f"The last good checkpoint is step {step}; rerunning the command resumes from it."


def free_space(path: Path) -> str:
  """Free bytes on the file system holding `path` (or its nearest existing parent), as text like '1.2 MB'."""
  if fs.is_url(path):
    return "unlimited (a bucket)"
  existing = Path(path)
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  free = shutil.disk_usage(existing).free
  for unit in ("B", "kB", "MB", "GB", "TB"):
    if free < 1000 or unit == "TB":
      return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
    free /= 1000


class _DropOrbaxErrors(logging.Filter):
  """Drops Orbax's ERROR records (failed async writes), gcsfs's (a request out of retries), and asyncio's
  reports of Orbax or TensorStore tasks whose failure nobody awaited after the first; the Checkpointer (or
  `fs.failure`) raises the failure as one line instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == "gcsfs":  # 'out of retries' with a traceback: the caller gets the error, and reports it
      return False
    if record.name == "asyncio":  # the task's failure: its text, and the files its traceback passes through
      error = record.exc_info[1] if record.exc_info else None
      frames = traceback.extract_tb(error.__traceback__) if error is not None else []
      text = record.getMessage() + str(error or "") + " ".join(frame.filename for frame in frames)
      return "orbax" not in text and "tensorstore" not in text
    return "orbax" not in record.pathname


class _DropOrbaxWarnings(logging.Filter):
  """Drops Orbax's WARNING records (e.g. 'CheckpointManagerOptions.read_only=True, setting max_to_keep=None',
  'Given directory is read only'), which describe Orbax's own choices, not a problem of the run."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and "orbax" in record.pathname)


@contextlib.contextmanager
def _orbax_warnings_dropped():
  """Scopes `_DropOrbaxWarnings` to one of our calls into Orbax (opening a manager, a restore); errors pass."""
  quiet = _DropOrbaxWarnings()
  logging.getLogger("absl").addFilter(quiet)
  try:
    yield
  finally:
    logging.getLogger("absl").removeFilter(quiet)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with jaxlm's two items, verified on restore."""

  def __init__(self, directory, keep: int = 3, read_only: bool = False):
    self.directory = _abspath(directory)
    # The run this folder belongs to: every save records it, every restore checks it (None: a run from before
    # run ids, or a folder that is no run's checkpoints; nothing to check).
    self.run_id = run_id.read_run_id(self.directory.parent)
    self._saved: set[int] = set()  # steps this Checkpointer saved whose file manifest is still to write
    self._save_started = self._last_probe = 0.0  # time.monotonic() of the newest save's start, of the last probe
    self._abandoned = False  # a save given up because the bucket stopped answering (see `_probe`)
    self._last_started: int | None = None  # the newest save started; Orbax runs one at a time, so a failure
    # that check() or wait() finds is this step's
    async_options = None if read_only else ocp.AsyncOptions(post_finalization_callback=self._write_file_manifests)
    with _orbax_warnings_dropped():  # the options warn too ('read_only=True, setting max_to_keep=None')
      options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        enable_async_checkpointing=not read_only,
        read_only=read_only,
        async_options=async_options,
      )
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    # Orbax logs each failed background write with a traceback; `check` and `wait` report it in one line.
    self._quiet = _DropOrbaxErrors()
    logging.getLogger("absl").addFilter(self._quiet)
    logging.getLogger("asyncio").addFilter(self._quiet)
    logging.getLogger("gcsfs").addFilter(self._quiet)
    _ignore_reads_finishing_after_a_failure()

  def incomplete(self) -> list[Path]:
    """Step folders an interrupted save left behind; Orbax ignores them."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

  def latest_step(self) -> int | None:
    """The newest step folder Orbax lists (not verified; see `newest_intact_step`)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def missing_markers(self, step: int) -> list[str]:
    """The commit markers step `step` lacks; a non-empty list means the save never completed."""
    folder = self.directory / str(step)
    return [name for name in COMMIT_MARKERS if not (folder / name).exists()]

  # Saving.

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts an async save of `state` (a dict of jax arrays) and `meta` (JSON); every process calls it.

    Records each array's checksum in `meta['integrity']` first. Refuses, with a
    CheckpointError, a state holding non-finite (or overflowing) values, and
    reports a failed earlier save before starting another.
    """
    self.check()
    arrays = integrity.describe(state)
    bad = [name for name, record in arrays.items() if not record["finite"]]
    if bad:
      raise CheckpointError(
        f"the state at step {step} has non-finite or overflowing values in '{bad[0]}' ({len(bad)} array(s)); "
        f"it was not saved. {last_good_sentence(self.newest_complete_step())} Lower optim.learning_rate "
        "or raise optim.warmup_steps."
      )
    meta = {**meta, "integrity": {"algorithm": integrity.ALGORITHM, "arrays": arrays}}
    if self.run_id is not None:
      meta["run_id"] = self.run_id
    try:
      # Orbax's save waits for the previous one too; waiting here first names that step if it failed.
      self._wait_for_manager()
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._last_started, e) from None
    self._saved.add(step)
    self._last_started = step
    self._save_started = time.monotonic()
    try:
      return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force
      )
    except Exception as e:  # noqa: BLE001 - any failure to write becomes one line naming the path
      raise self._save_error(step, e) from None

  def _write_file_manifests(self) -> None:
    """Process 0 records the files of each step this Checkpointer saved that is now complete (a step deleted
    by keep-last-K meanwhile is dropped). Runs as Orbax's post-finalization callback, which comes before
    the step's folder is renamed into place, so it covers the previous save; `wait` covers the last one."""
    for step in sorted(self._saved):
      folder = self.directory / str(step)
      if (self.directory / f"{step}.orbax-checkpoint-tmp").exists():
        continue  # still being written
      if folder.is_dir() and not self.missing_markers(step) and jax.process_index() == 0:
        # Best effort (a full disk): a step without its file list is still verified by its array checksums.
        with contextlib.suppress(OSError):
          integrity.write_file_manifest(folder)
      self._saved.discard(step)

  def check(self) -> None:
    """Raises CheckpointError if an async save has failed (e.g. the disk is full); cheap, call it every step."""
    try:
      self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        # A save whose finalization failed is over; this returns at once, or raises its error.
        self.manager.wait_until_finished()
      elif time.monotonic() - max(self._save_started, self._last_probe) > SAVE_PROBE_S:
        self._probe()  # a long save into a bucket: does the bucket still answer?
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._last_started, e) from None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
    text = _read_error_text(error)
    chain, current = "", error
    while current is not None and len(chain) < 1_000_000:
      chain, current = chain + str(current), current.__cause__ or current.__context__
    failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", chain)  # the step whose background write failed
    if "No space left on device" in chain or "os_error_code='28'" in chain:
      text = "No space left on device"
    which = f"step {failed.group(1)}" if failed else f"step {step}" if step is not None else "a checkpoint"
    broken_collective = r"Gloo|Connection (closed|reset) by peer|DEADLINE_EXCEEDED: Barrier|\bbarrier\b.*timed out"
    if re.search(broken_collective, chain):
      # The processes of the run stopped reaching each other (a peer lost mid-save), not a storage problem. The
      # trainer asks the watchdog first, which names a lost process itself (jaxlm/parallel/watchdog.py).
      return CheckpointError(
        f"saving {which} to {self.directory} failed: the processes of this run stopped reaching each other "
        f"({text}); check that every process still runs. {self._last_good_listed()} Restart all processes to resume."
      )
    if fs.is_url(self.directory):  # no disk to free: say what became of the bucket
      try:
        fs.check_access(self.directory, timeout_s=10)
      except fs.StorageError as diagnosis:  # the bucket is gone or silent: its checkpoints cannot be listed
        return CheckpointError(f"saving {which} to {self.directory} failed: {diagnosis}")
      return CheckpointError(f"saving {which} to {self.directory} failed ({text}). {self._last_good_listed()}")
    return CheckpointError(
      f"saving {which} to {self.directory} failed ({text}); {free_space(self.directory)} free "
      f"there. {last_good_sentence(self.newest_complete_step())} Free space or pick another --workdir."
    )

  def _last_good_listed(self) -> str:
    """`last_good_sentence` when the folder can still be listed; a bucket gone or silent cannot say."""
    try:
      return last_good_sentence(self.newest_complete_step())
    except Exception:  # noqa: BLE001 - the failure being reported makes the listing fail too
      return "Rerunning the command resumes from the last checkpoint that was saved."

  def newest_complete_step(self) -> int | None:
    """The newest step with all its commit markers (not verified against checksums)."""
    complete = [step for step in self.all_steps() if not self.missing_markers(step)]
    return complete[-1] if complete else None

  # Restoring.

  def read_meta(self, step: int) -> dict:
    """The step's `meta` item (config, data position, integrity records)."""
    try:
      with _orbax_warnings_dropped():
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - a missing or garbled metadata file is damage, named
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} is damaged: its meta item cannot be "
        f"read ({_first_line(e)}); {self._intact_clause(None, False, exclude=step)}"
      ) from None

  def _restore_verified(self, step: int, target, partial: bool):
    """The restored `state` tree; raises _Damaged (damage) or CheckpointError (the model does not match)."""
    missing = self.missing_markers(step)
    if missing:
      raise _Damaged(f"incomplete, the commit marker '{missing[0]}' is missing")
    folder = self.directory / str(step)
    absent = [name for name in STRUCTURE_FILES if not (folder / name).is_file()]
    if absent:
      raise _Damaged(f"the file '{absent[0]}' is missing")
    changed = integrity.file_problem(folder)
    if changed:
      raise _Damaged(changed)
    try:
      with _orbax_warnings_dropped():
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001
      raise _Damaged(f"the meta item cannot be read ({_first_line(e)})") from None
    saved_by = (meta or {}).get("run_id")
    if self.run_id is not None and saved_by is not None and saved_by != self.run_id:
      raise _Damaged(f"it belongs to another run (run id {saved_by}; this run's id is {self.run_id})")
    records = (meta or {}).get("integrity", {}).get("arrays")
    if records is not None:
      mismatch = integrity.mismatch_with_target(records, target, partial)
      if mismatch:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this model: {mismatch}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      with _orbax_warnings_dropped():
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)
          ),
        )["state"]
    except (ValueError, KeyError) as e:
      if records is None:  # saved before checksums existed: a structure error means another model
        raise CheckpointError(
          f"checkpoint step {step} in {self.directory} does not match this model: {_first_line(e)}"
        ) from None
      raise _Damaged(f"a file of the state item cannot be read ({_read_error_text(e)})") from None
    except Exception as e:  # noqa: BLE001 - TensorStore reports truncated or missing files in many types
      raise _Damaged(f"a file of the state item cannot be read ({_read_error_text(e)})") from None
    if records is not None:
      problem = integrity.first_damaged(records, restored)
      if problem:
        raise _Damaged(problem)
    return restored

  def restore(self, step: int, target, partial: bool = False):
    """Restores `state` into `target`, a tree of `jax.ShapeDtypeStruct` with shardings, and verifies it.

    With `partial=True` only the subtrees present in `target` are read (for
    example params alone, for evaluation), so the optimizer state never
    occupies memory. Raises CheckpointError, one line naming the damage and
    the intact steps, if the step is damaged.
    """
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
    try:
      return self._restore_verified(step, target, partial)
    except _Damaged as e:
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} is damaged: {e}; "
        f"{self._intact_clause(target, partial, exclude=step)}"
      ) from None

  def problem(self, step: int, target, partial: bool = False) -> str | None:
    """What is wrong with step `step` (restored into `target` and checked), or None if it is intact."""
    try:
      self._restore_verified(step, target, partial)
    except _Damaged as e:
      return str(e)
    return None

  def intact_steps(self, target, partial: bool = False, exclude: int | None = None) -> list[int]:
    """Steps that restore into `target` and pass verification, newest first (this reads each one)."""
    return [
      step for step in reversed(self.all_steps()) if step != exclude and self.problem(step, target, partial) is None
    ]

  def _intact_clause(self, target, partial: bool, exclude: int) -> str:
    intact = (
      self.intact_steps(target, partial, exclude)
      if target is not None
      else [step for step in reversed(self.all_steps()) if step != exclude and not self.missing_markers(step)]
    )
    if not intact:
      return "no other intact checkpoint exists in this run"
    return f"intact steps: {', '.join(map(str, intact))} (pass --step {intact[0]})"

  def newest_intact_step(self, target, partial: bool = False) -> int | None:
    """The newest step that restores into `target` and passes verification, or None."""
    intact = self.intact_steps(target, partial)
    return intact[0] if intact else None

  def restore_newest_intact(self, target, report) -> tuple[int | None, dict | None]:
    """(step, state) of the newest intact step, or (None, None) if there is none.

    Each damaged step newer than it is reported through `report(message)` and
    moved into `<directory>-damaged/`, so that a resumed run can save that
    step number again; nothing is deleted.
    """
    for step in reversed(self.all_steps()):
      try:
        return step, self._restore_verified(step, target, partial=False)
      except _Damaged as e:
        moved = self.quarantine(step)
        report(f"checkpoint step {step} is damaged: {e}; moved it to {moved} and trying an older step")
    return None, None

  def quarantine(self, step: int) -> Path:
    """Moves step `step` out of the way (process 0 moves, all wait); returns its new path."""
    destination = self.directory.parent / f"{self.directory.name}-damaged" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      fs.move(self.directory / str(step), destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # local: single-process runs never need it

      multihost_utils.sync_global_devices(f"jaxlm_quarantine_{step}")
    self.manager.reload()
    return destination

  def _probe(self) -> None:
    """For a bucket: raises CheckpointError, and gives the save up, when Cloud Storage no longer answers for
    it (the endpoint is gone, the bucket deleted), instead of waiting on a save that cannot finish."""
    self._last_probe = time.monotonic()
    if not fs.is_url(self.directory):
      return
    try:
      fs.check_access(self.directory, timeout_s=SAVE_PROBE_S)
    except fs.StorageError as e:
      self._abandoned = True
      raise SaveAbandonedError(
        f"saving step {self._last_started} to {self.directory} cannot finish: {e}. Rerunning the command "
        "resumes from the last checkpoint that was saved."
      ) from None

  def _wait_for_manager(self) -> None:
    """`manager.wait_until_finished()`; for a bucket, bounded: while it waits, `_probe` asks every
    SAVE_PROBE_S seconds whether the bucket still answers (a lost endpoint leaves Orbax waiting for
    many minutes)."""
    if self._abandoned:
      return
    if not fs.is_url(self.directory):
      self.manager.wait_until_finished()
      return
    outcome = {}

    def wait():
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
        outcome["error"] = e

    waiter = threading.Thread(target=wait, name="jaxlm-checkpoint-wait", daemon=True)
    waiter.start()
    waiter.join(SAVE_PROBE_S)
    while waiter.is_alive():
      self._probe()
      waiter.join(SAVE_PROBE_S)
    if "error" in outcome:
      raise outcome["error"]

  def wait(self) -> None:
    """Blocks until the async save finishes; raises CheckpointError if it failed."""
    try:
      self._wait_for_manager()
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._last_started, e) from None
    self.check()
    self._write_file_manifests()

  def close(self) -> None:
    """Waits for the last save (raising CheckpointError if it failed) and closes the manager.

    After a failure the filter of Orbax's error records stays: the failed save's writers may still log their
    own failures while the process ends with the one line that reports it."""
    if self._abandoned:  # the save was given up and reported; closing would wait on it again
      return
    try:
      self.wait()
    except CheckpointError:
      with contextlib.suppress(Exception):  # the failure is already being reported
        self.manager.close()
      raise
    self.manager.close()
    logging.getLogger("absl").removeFilter(self._quiet)


def abstract_with_shardings(abstract_tree, shardings):
  """A restore target: each leaf of `abstract_tree` as a `jax.ShapeDtypeStruct` carrying the matching sharding."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
