"""A run's identity: `WORKDIR/run_id.json`, made once when the run begins (`jaxlm.storage.run_dir`), written into
every checkpoint's metadata and checked by every restore (`jaxlm.storage.checkpoint`), so that a step folder that
another run wrote is not taken for this run's. Its own module, below both, which both import.
"""

from __future__ import annotations

import json
import uuid

from jaxlm.storage import fs

RUN_ID = "run_id.json"


def read_run_id(workdir: fs.PathLike) -> str | None:
  """The run id recorded when the run began.

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    The id, or None for a run that has none (made before run ids, or not a run directory); an unreadable
    record counts as none, and the checkpoints' own checks still apply.
  """
  location = fs.path(workdir) / RUN_ID
  if not location.is_file():
    return None
  try:
    run_id = json.loads(location.read_bytes().decode("utf-8")).get("run_id")
  except (ValueError, AttributeError):
    return None
  return run_id if isinstance(run_id, str) else None


def ensure_run_id(workdir: fs.PathLike) -> str:
  """The run's id, made and recorded now if the run has none yet (a new run, or one from before run ids).

  Args:
    workdir: the run directory, local or gs://; call it on process 0, with the work directory locked.

  Returns:
    The id.
  """
  run_id = read_run_id(workdir)
  if run_id is None:
    run_id = uuid.uuid4().hex
    fs.write_text(fs.path(workdir) / RUN_ID, json.dumps({"run_id": run_id}))
  return run_id
