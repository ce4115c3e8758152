"""Where a run's metrics go: metrics.jsonl and TensorBoard always, Weights & Biases when `train.wandb` names a
project.

Every process computes the same (replicated) metrics; only process 0 writes, so no process waits on another
to log. W&B is optional (`pip install -e '.[wandb]'` in the jaxlm checkout) and imported only when asked
for. Its run id is derived from the work directory, so a resumed run continues the same W&B run; its files go
under `WANDB_DIR` when set, else the (local) work directory. `WANDB_MODE=offline` logs without a network
(`wandb sync` uploads later).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax

from jaxlm import config as config_lib
from jaxlm.config import Config
from jaxlm.storage import fs


def wandb_run_id(workdir) -> str:
  """The W&B run id of a work directory: the same one each time the run resumes, lowercase hex."""
  return hashlib.sha256(os.fspath(fs.absolute(workdir)).encode()).hexdigest()[:16]


def start_wandb(config: Config, workdir):
  """A `wandb` run in project `config.train.wandb` with the whole config; ConfigError (one line) without wandb.

  Args:
    config: the whole config; `train.wandb` is the project, the rest is logged as the run's config.
    workdir: the run's work directory (a local folder or gs://): the run's name and id.

  Returns:
    The started `wandb` run (resumed when one with this work directory's id exists).
  """
  try:
    import wandb
  except ImportError:
    raise config_lib.ConfigError(
      f"train.wandb='{config.train.wandb}' logs to Weights & Biases, which is not installed: run "
      "pip install -e '.[wandb]' in the jaxlm checkout, or drop --config.train.wandb"
    ) from None
  directory = os.environ.get("WANDB_DIR") or (None if fs.is_url(os.fspath(workdir)) else os.fspath(workdir))
  return wandb.init(
    project=config.train.wandb,
    name=fs.path(workdir).name,
    id=wandb_run_id(workdir),
    resume="allow",
    config=config.to_dict(),
    dir=directory,
    # The trainer's own lines and bar stay on the terminal as they are; W&B gets the metrics, not the console.
    settings=wandb.Settings(console="off"),
  )


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl, workdir/tensorboard/ and, with `train.wandb`, a W&B run; on
  process 0 only.

  Args:
    workdir: the run's work directory (local or gs://); the files are appended to.
    config: the whole config (its `train.wandb`); None writes no W&B run.
  """

  def __init__(self, workdir: Path, config: Config | None = None):
    self.enabled = jax.process_index() == 0
    self.wandb = None
    if not self.enabled:
      return
    # First: a missing wandb stops before any file is opened. get: a config saved before the key existed.
    if config is not None and config.train.get("wandb"):
      self.wandb = start_wandb(config, workdir)
    # Local or gs:// (see jaxlm/storage/fs.py): a bucket's copy is rewritten at most every 30 s and on close.
    self.jsonl = fs.AppendFile(fs.join(workdir, "metrics.jsonl"))
    self.tensorboard = fs.tensorboard_writer(fs.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes `scalars` (name -> float) at `step`, flushed at once."""
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)

  def close(self) -> None:
    """Closes the files (a W&B run stays open for `finish`)."""
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()

  def finish(self, summary: dict | None) -> None:
    """Ends the W&B run, if any: with `summary` (what train_summary.json holds) as its summary, or as failed
    when None."""
    if self.wandb is None:
      return
    if summary is not None:
      self.wandb.summary.update(summary)
    self.wandb.finish(exit_code=0 if summary is not None else 1)
    self.wandb = None
