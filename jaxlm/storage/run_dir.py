"""A run directory: the files that `jaxlm train`, `jaxlm convert --from-hf` and `jaxlm quantize` write, and
that every command reading a run (`jaxlm.load`, a LoRA run's base, `train.init_from`) reads.

    WORKDIR/config.json     the whole config the run trained with (CONFIG)
    WORKDIR/tokenizer.json  the tokenizer's record, and the files it names (written by its own `save`)
    WORKDIR/checkpoints/    one Orbax checkpoint per step (CHECKPOINTS; `jaxlm.storage.checkpoint`)
    WORKDIR/run_id.json     the run's identity (`jaxlm.storage.run_id`), made once; every checkpoint
                            records it, and restores refuse a step another run wrote (older runs have none)

Storage is the lowest stage but one, below the config, the models and the data, so this module takes what
it writes as plain objects: a config with `to_json` and `to_dict` (an `ml_collections.ConfigDict`), a
tokenizer with `save(directory)`, and a state as a dict of arrays. It checks nothing of their contents:
`jaxlm.config.check_schema` checks a config read here.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from jaxlm.storage import fs, run_id

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"


def config_path(workdir: fs.PathLike) -> epath.Path:
  """The run's saved config file.

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    `workdir/config.json`.
  """
  return fs.path(workdir) / CONFIG


def checkpoints_path(workdir: fs.PathLike) -> epath.Path:
  """The folder of the run's checkpoints.

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    `workdir/checkpoints`.
  """
  return fs.path(workdir) / CHECKPOINTS


def read_config(workdir: fs.PathLike) -> ml_collections.ConfigDict | None:
  """The whole config a run saved, as written (not schema-checked).

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    The config, or None when `workdir` holds no config.json (each caller names the fix in its own words).
  """
  path = config_path(workdir)
  if not path.is_file():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def has_checkpoints(workdir: fs.PathLike) -> bool:
  """Whether the run's checkpoints folder holds anything (a step, or an interrupted save).

  Args:
    workdir: the run directory, local or gs://.

  Returns:
    True when `workdir/checkpoints` exists and is not empty.
  """
  folder = checkpoints_path(workdir)
  return folder.exists() and any(folder.iterdir())


def write_run_files(workdir: fs.PathLike, config, tokenizer) -> None:
  """Writes the run's config.json and tokenizer into `workdir` (created if needed), on process 0 only.

  Args:
    workdir: the run directory, local or gs://.
    config: the whole config (anything with `to_json(indent=...)`, e.g. `ml_collections.ConfigDict`).
    tokenizer: anything with `save(directory)`, which writes the tokenizer's own files.
  """
  import jax  # local: reading a run's files (`jaxlm plot`) needs no JAX

  if jax.process_index() != 0:
    return
  fs.makedirs(workdir)
  fs.write_text(config_path(workdir), config.to_json(indent=2))
  run_id.ensure_run_id(workdir)
  tokenizer.save(fs.path(workdir))


def write_checkpoint(workdir: fs.PathLike, step: int, state: dict, config, keep: int) -> None:
  """Saves `state` as checkpoint `step` of the run, with the metadata `jaxlm train` gives each checkpoint,
  and waits until it is written. Every process calls it.

  Args:
    workdir: the run directory, local or gs://.
    step: the step; it is also the data position recorded (nothing was trained on: a converted run starts
      at 0, an int8 run keeps its source's step).
    state: a dict of arrays, e.g. `TrainState.to_dict()` or {'params': ...}.
    config: the whole config (anything with `to_dict()`), recorded in the checkpoint's metadata.
    keep: the checkpoints the run keeps (`train.keep_checkpoints`).
  """
  from jaxlm.storage import checkpoint  # local: Orbax loads only to write (int8 decoding imports this module)

  saver = checkpoint.Checkpointer(checkpoints_path(workdir), keep=keep)
  saver.save(step, state, {"config": config.to_dict(), "data_position": step})
  saver.close()
