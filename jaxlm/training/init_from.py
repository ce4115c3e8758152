"""A new run that starts from another run's parameters: `train.init_from` (a work directory, local or gs://).

The new run, in its own --workdir, starts at step 0 with a fresh optimizer state and its own data, optimizer
and train settings; only its parameters come from the base run's checkpoint `train.init_from_step` (-1: the
newest complete one). The base run is only read. From the base come:

- the model section, except `OWN_KEYS`: how the run computes (dropout, compute dtype, remat, attention kernel)
  and its task (`family`, `num_classes`). The other keys fix the parameters, so a config's values for them are
  ignored (one line names them), and a `--config.model.KEY=VALUE` override that differs from the base's value
  is refused (`check_overrides`, called by `jaxlm train`);
- the tokenizer (a converted run's hf_tokenizer/ folder and chat template, a SentencePiece model):
  `data.tokenizer` and `data.tokenizer_path` name the copy the base saved, and the run saves its own.

The family may differ from the base's when the two share a body. Each family names its task head's parameter
subtree (`jaxlm.families.Family.head`), so an `encoder_classifier` or `encoder_qa` run starts from an `encoder`
(BERT MLM) run and a `decoder_classifier` from a `decoder` run: every array outside the heads must match by
name and shape (else one line names the first that does not), a head the base lacks starts from its
initialization, and the base's own head is dropped.

The parameters are read once, through `jaxlm.load`, onto the new run's mesh and verified against their
checksums. config.json records the resolved base directory and step; a restart resumes from the run's own
checkpoints and reads neither the base's parameters nor its config.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxlm import config as config_lib
from jaxlm import families, loader
from jaxlm.config import Config, ConfigError
from jaxlm.models import lora
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs, run_dir

# Model keys a run started from another takes from its own config: how it computes, and its task head (the
# schema's `WEIGHTS_FREE` marks). The others (sizes, layout, parameter dtype, normalization, positions) describe
# the base's parameters.
OWN_KEYS = config_lib.model_keys("task", "runtime")


def enabled(config: Config) -> bool:
  """True when the whole `config` starts a new run from another run's parameters (`train.init_from`)."""
  return bool(config.train.init_from)


def _read_config(base_dir) -> Config:
  """The base run's saved config; ConfigError naming the key and the file when there is none, or it is garbled."""
  if not run_dir.config_path(base_dir).is_file():
    raise ConfigError(
      f"train.init_from: {run_dir.config_path(base_dir)} not found; pass the work directory "
      "of a `jaxlm train` or `jaxlm convert --from-hf` run"
    )
  try:
    return loader.load_config(base_dir)
  except loader.RunError as e:
    raise ConfigError(f"train.init_from: {e}") from None


def _base_step(base_dir, step: int) -> int:
  """`step` when the base run has it; for -1, its newest complete checkpoint. ConfigError otherwise."""
  checkpointer = checkpoint_lib.Checkpointer(fs.path(base_dir) / "checkpoints", read_only=True)
  try:
    steps, newest = checkpointer.all_steps(), checkpointer.newest_complete_step()
  finally:
    checkpointer.close()
  if step >= 0 and step not in steps:
    raise ConfigError(
      f"train.init_from_step={step}: {base_dir} has no checkpoint of that step; its steps: "
      f"{', '.join(map(str, steps)) or 'none'}"
    )
  if step < 0 and newest is None:
    raise ConfigError(
      f"train.init_from: no complete checkpoint in {fs.path(base_dir) / 'checkpoints'}; train that run first"
    )
  return step if step >= 0 else newest


def _tokenizer_keys(run_dir) -> tuple[str, str]:
  """(data.tokenizer, data.tokenizer_path) naming the tokenizer a run saved (see `jaxlm.data.tokenizer`'s `save`)."""
  path = fs.path(run_dir) / "tokenizer.json"
  try:
    saved = json.loads(path.read_text())
    name = saved.get("folder") or saved.get("file")
    return saved["kind"], os.fspath(fs.path(run_dir) / name) if name else ""
  except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:  # missing, garbled, or not the record
    raise ConfigError(
      f"train.init_from: {path} is not a readable tokenizer record ({type(e).__name__}: {e}); restore that "
      "run's tokenizer.json"
    ) from None


def _name(path) -> str:
  """A parameter's tree path as 'a/b/kernel'."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def _names(tree) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a parameter tree (arrays or shapes; logical boxes removed)."""
  return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))}


def _under(name: str, head: str | None) -> bool:
  return head is not None and name.split("/", 1)[0] == head


def plan(base_params, params, base_family: str, family: str, base_dir) -> dict[str, list[str]]:
  """Which arrays a run of model.family `family` takes from a run of `base_family` (in `base_dir`).

  base_params, params: the base's and the new model's parameter trees (arrays or shapes). Returns
  {'copied': names, 'new': names under `family`'s head the base lacks (or has in another shape), 'dropped':
  the base's names under `base_family`'s head that the new model lacks}; names are '/'-joined paths. Raises
  ConfigError naming the first array outside the heads that is missing on either side or differs in shape.
  """
  base, new = _names(base_params), _names(params)
  head, base_head = families.get(family).head, families.get(base_family).head
  parts = {"copied": [], "new": [], "dropped": []}

  def misfit(reason: str) -> ConfigError:
    return ConfigError(
      f"train.init_from: {base_dir} (model.family '{base_family}') does not fit model.family "
      f"'{family}': {reason}; start from a run of this family, or of one with the same body"
    )

  for name, leaf in new.items():
    if name in base and base[name].shape == leaf.shape:
      parts["copied"].append(name)
    elif _under(name, head):
      parts["new"].append(name)
    elif name in base:
      raise misfit(f"array '{name}' has shape {tuple(base[name].shape)} there, this model's is {tuple(leaf.shape)}")
    else:
      raise misfit(f"this model's array '{name}' is not there")
  copied = set(parts["copied"])
  for name in base:
    if name in copied:
      continue
    if not _under(name, base_head):
      raise misfit(f"its array '{name}' is not in this model")
    parts["dropped"].append(name)
  return parts


def resolve(config: Config, workdir, log: Callable[[str], None] = print, model: nn.Module | None = None) -> Config:
  """A copy of the whole `config` bound to its base run, before the run writes anything.

  `train.init_from` becomes absolute and `train.init_from_step` the checkpoint to read (for -1: the one
  `workdir`'s config.json recorded for this base, else the newest complete one); the model section is the
  base's but for `OWN_KEYS` (`log` names the keys the config set otherwise); `data.tokenizer` and
  `data.tokenizer_path` name the base's saved tokenizer. On a first start, the base's parameters are checked
  to fit `model` (default the family's model of the result) by shapes alone (`plan`). A restart of a run that
  recorded this base reads that record instead of the base. Raises ConfigError.
  """
  if lora.enabled(config):
    raise ConfigError(
      "train.init_from and lora.rank > 0 both name a base run: for adapters over a frozen run "
      "keep lora.base_workdir and drop train.init_from; to fine-tune all weights set lora.rank=0"
    )
  base_dir = fs.absolute(config.train.init_from)
  if base_dir == fs.absolute(workdir):
    raise ConfigError(
      "train.init_from names this run's own --workdir, which resumes by itself; pass another "
      "run's work directory, or drop train.init_from"
    )
  config = config.copy_and_resolve_references()
  record = loader.load_config(workdir) if run_dir.config_path(workdir).is_file() else None
  restarted = record is not None and record.train.get("init_from") == str(base_dir)
  step = config.train.init_from_step
  if restarted:  # what the run recorded at its start: the base may have moved on (or be gone) since
    source, source_dir = record, workdir
    step = record.train.init_from_step if step < 0 else step
  else:
    source, source_dir = _read_config(base_dir), base_dir
    step = _base_step(base_dir, step)
  config.model = config_lib.model_of_run(config.model, source.model, log, "init_from", base_dir, OWN_KEYS)
  config.data.tokenizer, config.data.tokenizer_path = _tokenizer_keys(source_dir)
  config.data.spm_vocab_size = 0  # the vocabulary exists: never train another
  config.train.init_from, config.train.init_from_step = str(base_dir), step
  if not restarted:
    plan(
      loader.abstract_params(source.model),
      loader.abstract_params(config.model, model),
      source.model.family,
      config.model.family,
      base_dir,
    )
  return config


def check_overrides(config: Config, overrides: list[str]) -> None:
  """ConfigError for the first `--config.model.KEY=VALUE` of `overrides` whose KEY is not in `OWN_KEYS` and whose
  value in the whole `config` differs from that of the run `train.init_from` names: that run's parameters fix it."""
  keys = [arg[len("--config.model.") :].split("=", 1)[0] for arg in overrides if arg.startswith("--config.model.")]
  fixed = [key for key in keys if key not in OWN_KEYS]
  if not fixed:
    return
  base_dir = fs.absolute(config.train.init_from)
  base = _read_config(base_dir).model
  for key in fixed:
    if config.model[key] != base.get(key):
      raise ConfigError(
        f"config key 'model.{key}' is {config.model[key]!r} but train.init_from's run {base_dir} has "
        f"{base.get(key)!r}; its parameters fix every model key but model.{', model.'.join(OWN_KEYS)}"
      )


def initial_state(state, s, config: Config, log: Callable[[str], None] = print):
  """The fresh `state` (`train_step.create_state(s, ...)`) with the params it shares with the base run.

  s: the run's `train_step.Setup`. config: the whole config `resolve` returned. The base's params are read
  through `jaxlm.load` at `train.init_from_step` onto `s.mesh` by the run's logical rules, and verified against
  their checksums (a damaged step raises `checkpoint.CheckpointError`, one line). `plan` says which arrays are
  copied; `log` gets one line of the counts. The optimizer state stays the fresh one, which depends only on the
  params' shapes (adamw, adafactor and lion start from zeros).
  """
  base_dir, step = config.train.init_from, config.train.init_from_step
  base = loader.load(base_dir, step, s.mesh, rules=s.rules)
  base_family = base.config.model.family
  parts = plan(base.params, state.params, base_family, config.model.family, base_dir)
  base_arrays, copied = _names(base.params), set(parts["copied"])

  take = lambda path, leaf: base_arrays[_name(path)] if _name(path) in copied else leaf
  params = jax.device_put(jax.tree_util.tree_map_with_path(take, state.params), s.state_shardings.params)
  counts = [f"{len(parts['copied'])} arrays copied"]
  if parts["new"]:
    counts.append(f"{len(parts['new'])} new ({families.get(config.model.family).head})")
  if parts["dropped"]:
    counts.append(f"{len(parts['dropped'])} dropped ({families.get(base_family).head})")
  log(f"init_from {base_dir} step {base.step}: {', '.join(counts)}")
  return state.replace(params=params)
