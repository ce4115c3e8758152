"""jaxlm: Transformer language models in JAX/Flax, from data to deployment.

The public names, imported on first use (so `import jaxlm` loads no JAX, Flax or Orbax, and changes no
process-wide state):

  load(workdir, step=None, mesh=None, model=None, rules=None) -> Run   a run: config, model, params, tokenizer, step
  save(workdir, run_or_config, params=None, tokenizer=None, *, step=None, model=None)   params as a run directory
  init(config_or_model, seed=0, *, batch=None, deterministic=False) -> (model, params)   fresh plain params
  count_params(params) -> int                 the parameters in a tree
  apply_lora(config, base_params, rank=8, ...) -> (model, adapters), merge_lora(model, adapters) -> params
  train(config, workdir, **kwargs) -> dict    the training loop (`Trainer(...).run()`)
  Trainer, Callback                           the open loop: your model, data, loss and hooks
  TrainState, LossFn, cross_entropy_loss      the train state and the objective's contract (extra NAME_sum terms)
  LanguageModel                               the contract a Flax module meets to be trained
  build_model(model_cfg, decode=False, deterministic=True)   a family's model from `config.model`
  DecoderLM, EncoderDecoder, Encoder          the built-in families' models
  Norm, Attention, Mlp, Block, Stack, Embedder the layers they are built from
  attention_weights(model, params, tokens)     every attention layer's B x N x T x S weights, no rebuild
  base_config, load_config_file               configs (`config` = whole config, `model_cfg` = config.model)
  make_mesh                                   the ('data', 'fsdp', 'tensor') mesh a config asks for
  Family, register_family                     add a model family
  Generator, Sampling, beam_search            cached decoding
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
  "load": ("jaxlm.loader", "load"),
  "Run": ("jaxlm.loader", "Run"),
  "save": ("jaxlm.training.saving", "save"),
  "init": ("jaxlm.models.initialize", "init"),
  "count_params": ("jaxlm.models.initialize", "count_params"),
  "apply_lora": ("jaxlm.models.lora", "apply_lora"),
  "merge_lora": ("jaxlm.models.lora", "merge_lora"),
  "train": ("jaxlm.training.trainer", "train"),
  "Trainer": ("jaxlm.training.trainer", "Trainer"),
  "Callback": ("jaxlm.training.trainer", "Callback"),
  "TrainState": ("jaxlm.training.step", "TrainState"),
  "LossFn": ("jaxlm.training.step", "LossFn"),
  "cross_entropy_loss": ("jaxlm.training.step", "cross_entropy_loss"),
  "LanguageModel": ("jaxlm.families", "LanguageModel"),
  "Family": ("jaxlm.families", "Family"),
  "register_family": ("jaxlm.families", "register"),
  "build_model": ("jaxlm.models.transformer", "build"),
  "DecoderLM": ("jaxlm.models.transformer", "DecoderLM"),
  "EncoderDecoder": ("jaxlm.models.transformer", "EncoderDecoder"),
  "Encoder": ("jaxlm.models.transformer", "Encoder"),
  "Norm": ("jaxlm.models.layers", "Norm"),
  "Attention": ("jaxlm.models.layers", "Attention"),
  "Mlp": ("jaxlm.models.layers", "Mlp"),
  "Block": ("jaxlm.models.layers", "Block"),
  "Stack": ("jaxlm.models.layers", "Stack"),
  "Embedder": ("jaxlm.models.layers", "Embedder"),
  "attention_weights": ("jaxlm.models.transformer", "attention_weights"),
  "base_config": ("jaxlm.config", "base_config"),
  "load_config_file": ("jaxlm.config", "load_config_file"),
  "make_mesh": ("jaxlm.parallel.mesh", "make_mesh"),
  "Generator": ("jaxlm.inference.decode", "Generator"),
  "Sampling": ("jaxlm.inference.decode", "Sampling"),
  "beam_search": ("jaxlm.inference.decode", "beam_search"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
