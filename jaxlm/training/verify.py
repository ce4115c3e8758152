"""`jaxlm verify --workdir RUN [--step N]`: restore each checkpoint and check it against its saved checksums.

Each step is restored in full (parameters and optimizer state) onto the
run's mesh, or onto all devices along the data axis when that mesh does not
fit this machine, and checked as `train` would check it before resuming.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxlm import loader
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs
from jaxlm.training import step as train_lib


def verify_run(workdir: str | Path, step: int | None = None) -> list[dict]:
  """[{'step', 'status', 'detail'}] for each checkpoint of `workdir` (or step `step` alone), oldest first.

  status is 'intact', 'no checksums' (restores, but was saved before jaxlm recorded checksums) or 'DAMAGED'.
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
  results = []
  for each in steps:
    problem = checkpointer.problem(each, target)
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
  checkpointer.close()
  return results


def format_table(results: list[dict]) -> str:
  """The table `jaxlm verify` prints: one row per step."""
  width = max(len(r["status"]) for r in results)
  lines = [f"{'step':>8}  {'status':<{width}}  detail"]
  lines += [f"{r['step']:>8}  {r['status']:<{width}}  {r['detail']}" for r in results]
  intact = [str(r["step"]) for r in results if r["status"] != "DAMAGED"]
  lines.append(
    f"{len(results) - len(intact)} damaged of {len(results)}; intact steps: {', '.join(intact) if intact else 'none'}"
  )
  return "\n".join(lines)
