"""`jaxlm.save`: parameters from Python as a run directory that `jaxlm.load` and every command read back.

A saved run is laid out as a trained one (and as `jaxlm convert --from-hf` writes one): config.json, the
tokenizer, and an Orbax checkpoint of the `TrainState` (the params and a fresh optimizer state) with the
checksums `jaxlm verify` checks. `jaxlm train --workdir` on it fine-tunes from the saved parameters.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import JaxlmError
from jaxlm.loader import Run
from jaxlm.models import lora
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.storage import fs, run_dir
from jaxlm.training import step as train_step


class SaveError(JaxlmError, ValueError):
  """What `save` refuses (a folder holding another run, params of another model); one line with the fix."""


def _first_difference(params, expected) -> str:
  """'NAME' of the first parameter missing, extra or of another shape in `params` versus `expected`."""
  path_name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
  found = {path_name(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  wanted = {path_name(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  for name in sorted(wanted.keys() | found.keys()):
    if name not in found:
      return f"'{name}' is missing"
    if name not in wanted:
      return f"'{name}' is not in the model"
    if tuple(found[name]) != tuple(wanted[name]):
      return f"'{name}' has shape {tuple(found[name])}, the model's is {tuple(wanted[name])}"
  return "their tree structure differs"


def save(
  workdir: str | Path, run_or_config, params=None, tokenizer=None, *, step: int | None = None, model=None
) -> Path:
  """Saves parameters as a run directory that `jaxlm.load` and `jaxlm eval/generate/serve` read.

  Args:
    workdir: the folder to write (local or gs://); it must hold no checkpoints yet.
    run_or_config: a `jaxlm.Run` (from `jaxlm.load`; its params, tokenizer and step are saved unless given), or
      a whole config (`config.model` describes the model the params belong to).
    params: the parameter tree (plain or boxed arrays, e.g. `jaxlm.init`'s); required with a config.
    tokenizer: the tokenizer to save with it; default the Run's, or the one the config names (`data.tokenizer`).
    step: the checkpoint step to write; default the Run's step, or 0.
    model: the Flax module the params belong to, when it is not the family model of `config.model` (a run
      trained with `Trainer(model=...)`); load it back with `jaxlm.load(workdir, model=model)`.

  Returns:
    The run directory.

  Raises:
    SaveError: `workdir` already holds checkpoints; no params with a config; params that do not fit the model;
      a config with `lora.rank` > 0 (save the merged model: `jaxlm.load` merges, `jaxlm.merge_lora` too).
  """
  if isinstance(run_or_config, Run):
    config = run_or_config.config
    params = run_or_config.params if params is None else params
    tokenizer = run_or_config.tokenizer if tokenizer is None else tokenizer
    step = run_or_config.step if step is None else step
  else:
    config = run_or_config
    if params is None:
      raise SaveError("jaxlm.save(workdir, config, params): params is missing; pass the parameter tree to save")
  if lora.enabled(config):
    raise SaveError(
      "jaxlm.save: config.lora.rank > 0 describes adapters over a base run; save merged parameters with the "
      "base config (`jaxlm.load` of a LoRA run returns both, or use `jaxlm.merge_lora`)"
    )
  workdir = fs.path(workdir)
  if run_dir.has_checkpoints(workdir):
    raise SaveError(f"{run_dir.checkpoints_path(workdir)} already holds checkpoints; save into a new or empty folder")
  step = 0 if step is None else int(step)
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(params))
  # The saved config stays as given; the state is placed on a mesh these devices hold.
  placed_config = mesh_lib.fit_mesh(config, jax.device_count())
  s = train_step.setup(placed_config, mesh_lib.make_mesh(placed_config), model)
  expected = s.abstract_state.params
  if jax.tree.structure(params) != jax.tree.structure(expected) or any(
    tuple(a.shape) != tuple(b.shape) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))
  ):
    hint = "" if model is not None else "; params of a custom model need model=the module"
    raise SaveError(
      f"jaxlm.save: the params do not fit the model of config.model: {_first_difference(params, expected)}{hint}"
    )

  def make_state(p):
    return train_step.TrainState(step=jnp.asarray(step, jnp.int32), params=p, opt_state=s.tx.init(p))

  # Arrays committed elsewhere (one device, another mesh) move first: jit takes no arguments across meshes.
  state = jax.jit(make_state, out_shardings=s.state_shardings)(jax.device_put(params, s.state_shardings.params))
  run_dir.write_run_files(workdir, config, tokenizer or tokenizer_lib.from_config(config.data))
  run_dir.write_checkpoint(workdir, step, state.to_dict(), config, keep=config.train.keep_checkpoints)
  return workdir
