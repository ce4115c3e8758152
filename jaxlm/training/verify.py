"""`jaxlm verify --workdir RUN [--step N]`: restore each checkpoint and check it against its saved checksums.

Each step is restored in full (parameters and optimizer state) onto the
run's mesh, or onto all devices along the data axis when that mesh does not
fit this machine, and checked as `train` would check it before resuming.

`verify` may run beside a live `train` (it takes no lock). What that run
changes meanwhile is not damage: a step without its commit markers, newer
than every complete step, while a live run holds the work directory, is
"being written"; a step that fails because it vanished during the check
(keep-last-K deleted it) is "removed while verifying". Both count as neither
intact nor damaged.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxlm import loader
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs, runlock
from jaxlm.training import step as train_lib

IN_FLIGHT = ("being written", "removed while verifying")  # statuses of steps a live run is changing


def verify_run(workdir: str | Path, step: int | None = None) -> list[dict]:
  """[{'step', 'status', 'detail'}] for each checkpoint of `workdir` (or step `step` alone), oldest first.

  status is 'intact', 'no checksums' (restores, but was saved before jaxlm recorded checksums), 'DAMAGED', or
  one of IN_FLIGHT for a step a live run is writing or deleted meanwhile (see the module docstring).
  Raises CheckpointError when the run has no checkpoint or no step `step`.
  """
  config = mesh_lib.fit_mesh(loader.load_config(workdir), jax.device_count())  # else all devices on data
  s = train_lib.setup(config, mesh_lib.make_mesh(config))
  target = checkpoint_lib.abstract_with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
  checkpointer = checkpoint_lib.Checkpointer(fs.path(workdir) / "checkpoints", read_only=True)
  steps = checkpointer.all_steps()
  if not steps:
    raise checkpoint_lib.CheckpointError(f"no checkpoint in {checkpointer.directory}; nothing to verify")
  if step is not None:
    if step not in steps:
      raise checkpoint_lib.CheckpointError(
        f"no checkpoint for step {step} in {checkpointer.directory}; available: {steps}"
      )
    steps = [step]
  live = runlock.holder(workdir)
  complete = [each for each in checkpointer.all_steps() if not checkpointer.missing_markers(each)]
  results = []
  for each in steps:
    if live and not (checkpointer.directory / str(each)).exists():
      results.append({"step": each, "status": IN_FLIGHT[1], "detail": "deleted by the live run (keep-last-K)"})
      continue
    if live and checkpointer.missing_markers(each) and each > max(complete, default=-1):
      results.append({"step": each, "status": IN_FLIGHT[0], "detail": _by(live)})
      continue
    problem = checkpointer.problem(each, target)
    if problem is not None and not (checkpointer.directory / str(each)).exists():
      results.append({"step": each, "status": IN_FLIGHT[1], "detail": "it was deleted during the check (keep-last-K)"})
      continue
    if problem is not None:
      results.append({"step": each, "status": "DAMAGED", "detail": problem})
      continue
    records = checkpointer.read_meta(each).get("integrity")
    detail = (
      f"{len(records['arrays'])} arrays match their checksums"
      if records
      else "restores, but was saved without checksums"
    )
    results.append({"step": each, "status": "intact" if records else "no checksums", "detail": detail})
  if live:
    for folder in checkpointer.incomplete():  # a save in progress, renamed into place when it commits
      results.append({"step": folder.name.split(".", 1)[0], "status": IN_FLIGHT[0], "detail": _by(live)})
  checkpointer.close()
  return results


def _by(holder: dict) -> str:
  return f"a save of the live run (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}) in progress"


def format_table(results: list[dict]) -> str:
  """The table `jaxlm verify` prints: one row per step."""
  width = max(len(r["status"]) for r in results)
  lines = [f"{'step':>8}  {'status':<{width}}  detail"]
  lines += [f"{r['step']:>8}  {r['status']:<{width}}  {r['detail']}" for r in results]
  intact = [str(r["step"]) for r in results if r["status"] not in ("DAMAGED", *IN_FLIGHT)]
  damaged = sum(r["status"] == "DAMAGED" for r in results)
  changing = len(results) - len(intact) - damaged
  lines.append(
    f"{damaged} damaged of {len(results) - changing}; intact steps: {', '.join(intact) if intact else 'none'}"
    + (f"; {changing} changed by the live run meanwhile (not checked)" if changing else "")
  )
  return "\n".join(lines)
