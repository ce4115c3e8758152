"""One loader for a trained run: `load(workdir, step=None, mesh=None)`.

Every command that reads a run (eval, generate, serve, export, quantize,
convert --to-hf) goes through `load`, and so can research code:

    run = jaxlm.load("runs/tiny")
    logits_BxTxV = run.model.apply({"params": run.params}, tokens_BxT)

It reads the run's saved config (unchanged: no mesh or batch size is
rewritten), its tokenizer, and the parameters of one checkpoint, restored
straight into their target shardings. No optimizer is built and its state is
never read, so a run loads in the memory of its parameters alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.sharding import Mesh

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.config import Config, ModelConfig
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import JaxlmError
from jaxlm.models import lora, quantize
from jaxlm.models import transformer as model_lib
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs, integrity, run_dir


class RunError(JaxlmError, RuntimeError):
  """A work directory that is not a finished `jaxlm train` run (no config, no checkpoint)."""


class Run(NamedTuple):
  """A loaded run.

  config: the whole saved config (`ml_collections.ConfigDict`; `config.model` is the model sub-config).
  model: the family's Flax module, built from `config.model` (deterministic, not for cached decoding).
  params: the parameter tree, on the mesh given to `load` or on one device.
  tokenizer: the run's `jaxlm.data.tokenizer.Tokenizer`.
  step: the checkpoint step the params come from.
  """

  config: Config
  model: nn.Module
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  step: int

  def score(
    self, texts, batch_size: int = 8, max_len: int | None = None, stride: int | None = None, hidden_states: bool = False
  ):
    """Per-token log-probabilities, loss (mean NLL) and token count of each text, for a decoder run; long texts
    in windows with context. See `jaxlm.inference.score.score`.

    Args:
      texts: a list of strings.
      batch_size: windows run together.
      max_len: tokens per window (default and most: model.max_len); stride: tokens each further window scores.
      hidden_states: also return every layer's hidden states at the text's tokens.

    Returns:
      A list of `jaxlm.inference.score.ScoredText` (token_ids, logprobs, is_greedy, loss, num_tokens,
      hidden_states).
    """
    from jaxlm.inference import score as score_lib  # at the loader's stage (tests/unit/test_imports.py)

    return score_lib.score(self, texts, batch_size, max_len, stride, hidden_states)


def load_config(workdir: str | Path) -> Config:
  """The whole config a run saved in `workdir/config.json`, schema-checked; raises RunError if absent or garbled."""
  fs.check_access(workdir)  # a gs:// bucket that is missing or refuses access: one line
  path = run_dir.config_path(workdir)
  try:
    config = run_dir.read_config(workdir)
    if config is not None:
      config_lib.check_schema(config)
  except (ValueError, AttributeError, TypeError) as e:  # not JSON, not an object (ConfigDict), or not the schema's
    raise RunError(
      f"{path} is not a readable config ({' '.join(str(e).split())[:200]}); restore the run's config.json"
    ) from None
  if config is None:
    raise RunError(f"{path} not found; pass the --workdir of a run started with `jaxlm train`")
  return config


def single_device_mesh() -> Mesh:
  """A 1 x 1 x 1 mesh (axes data, fsdp, tensor) on the first device."""
  return mesh_lib.mesh_of_sizes(dict.fromkeys(mesh_lib.AXES, 1))


def abstract_params(model_cfg: ModelConfig, module: nn.Module | None = None):
  """The boxed (logically partitioned) parameter shapes of the model `model_cfg` describes; nothing is allocated."""
  module = module or model_lib.build(model_cfg)
  batch = model_lib.example_batch(model_cfg, (1, 8))  # parameter shapes do not depend on the length
  return jax.eval_shape(lambda: module.init(jax.random.key(0), **families.model_inputs(module, batch))["params"])


def param_shardings(config: Config, mesh: Mesh, module: nn.Module | None = None, rules: tuple | None = None):
  """NamedShardings of the params on `mesh`, by `rules` (default the whole `config`'s `mesh.rules`)."""
  rules = rules if rules is not None else config_lib.mesh_rules(config)
  return sharding.logical_shardings(mesh, rules, abstract_params(config.model, module))


def restore_params(
  workdir: str | Path, config: Config, shardings, step: int | None = None, module: nn.Module | None = None
):
  """(params, step): the params of checkpoint `step` (default: the latest) in `workdir`, placed by `shardings`.

  `config` is the whole config; `shardings` a tree of NamedShardings matching the params; `module` the model
  (default: the family's). Raises RunError when the run has no complete checkpoint,
  `checkpoint.CheckpointError` when `step` is missing or does not match.
  """
  abstract = nn.meta.unbox(abstract_params(config.model, module))
  sharding.check_divisible(abstract, shardings, "mesh")  # else Orbax calls the checkpoint damaged
  target = {"params": checkpoint_lib.abstract_with_shardings(abstract, shardings)}
  if quantize.is_int8_run(workdir):  # written by `jaxlm quantize`: int8 params, no optimizer state
    target = {"params": quantize.abstract_int8(target["params"])}
  checkpointer = checkpoint_lib.Checkpointer(run_dir.checkpoints_path(workdir), read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise RunError(f"no complete checkpoint in {checkpointer.directory}; train first")
    _check_model_fits(checkpointer, step, target, module)
    params = checkpointer.restore(step, target, partial=True)["params"]
  finally:
    checkpointer.close()
  return params, step


def _check_model_fits(checkpointer: checkpoint_lib.Checkpointer, step: int, target, module) -> None:
  """RunError when checkpoint `step` cannot fill `target`, naming `load`'s `model=` for a custom model's run."""
  if step not in checkpointer.all_steps():
    return  # `restore` names the steps there are
  records = (checkpointer.read_meta(step) or {}).get("integrity", {}).get("arrays")
  mismatch = integrity.mismatch_with_target(records, target, partial=True) if records is not None else None
  if mismatch is None:
    return
  if module is None:
    fix = (
      "a run trained with its own module (`Trainer(model=...)`) loads from Python: "
      "jaxlm.load(workdir, model=that_module)"
    )
  else:
    fix = "pass model= the module this run was trained with"
  raise RunError(
    f"checkpoint step {step} in {checkpointer.directory} does not fit the model "
    f"({'config.model' if module is None else 'model='}): {mismatch}; {fix}"
  )


def load(
  workdir: str | Path,
  step: int | None = None,
  mesh: Mesh | None = None,
  model: nn.Module | None = None,
  rules: tuple | None = None,
) -> Run:
  """Loads a run: `Run(config, model, params, tokenizer, step)`.

  workdir: a `jaxlm train` (or `jaxlm convert --from-hf`) work directory.
  step: the checkpoint to read; None takes the latest complete one.
  mesh: a `jax.sharding.Mesh` with axes ('data', 'fsdp', 'tensor'); the params are sharded onto it by the
    run's logical rules (`config.mesh.rules`); decode with `decode.Generator(..., mesh=mesh, rules=...)` to shard
    the KV cache too. None puts them whole on the first device, which suits a model that fits one.
  model: the Flax module a run trained with `Trainer(model=...)` was built from (its parameter shapes are
    read from it); None builds the family's model from `config.model`.
  rules: logical axis rules ((name, mesh axes), ...) to shard by instead of the run's, e.g. those of a run
    that starts from this one's parameters (`train.init_from`).
  """
  config = load_config(workdir)
  if model is None and lora.enabled(config):  # adapters merged into their base: a plain run to every command
    lora.check_base(config)  # the base they were trained over, not another run in its folder
    base = load(config.lora.base_workdir, config.lora.base_step, mesh, rules=rules)
    module = lora.adapted_model(config, base.params, deterministic=True)
    adapters, step = restore_params(
      workdir, config, param_shardings(config, mesh or single_device_mesh(), module, rules), step, module
    )
    return Run(
      lora.without_adapters(config),
      base.model,
      lora.merged_params(config, adapters, base.params),
      tokenizer_lib.load(workdir),
      step,
    )
  tokenizer = tokenizer_lib.load(workdir)
  module = model if model is not None else model_lib.build(config.model)
  shardings = param_shardings(config, mesh or single_device_mesh(), module, rules)
  params, step = restore_params(workdir, config, shardings, step, model)  # None: the family's, named in errors
  return Run(config, module, params, tokenizer, step)
