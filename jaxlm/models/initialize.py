"""Fresh parameters for research code: `init(config_or_model, seed)` -> (model, plain params), `count_params`.

`module.init` returns parameters boxed in `nn.LogicallyPartitioned` (their logical axis names, which the
trainer shards by); `init` unboxes them into plain arrays, the tree that `model.apply`, `jaxlm.save` and the
trainer's checkpoints hold.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from jaxlm import families
from jaxlm.models import transformer as model_lib


def _module_of(config_or_model, deterministic: bool) -> nn.Module:
  if isinstance(config_or_model, nn.Module):
    return config_or_model
  if isinstance(config_or_model, ml_collections.ConfigDict):
    model_cfg = config_or_model.model if "model" in config_or_model else config_or_model
    return model_lib.build(model_cfg, deterministic=deterministic)
  raise TypeError(
    f"init takes a whole config, its `model` section or a Flax module; got {type(config_or_model).__name__}"
  )


def init(config_or_model, seed: int = 0, *, batch: dict | None = None, deterministic: bool = False):
  """A model and its freshly initialized parameters, as plain (unboxed) arrays on the default device.

  Args:
    config_or_model: a whole config (its `model` section is used), a model section (`config.model`), or a
      Flax module meeting `jaxlm.LanguageModel`.
    seed: the initialization seed.
    batch: the example batch to trace the model on (a dict of B x T arrays of the data's keys); default a
      1 x 8 batch of the family's structure (the decoder's for a module without a `cfg`).
    deterministic: for a model built from a config: False (the default) builds it with dropout on, as the
      trainer does (apply it with rngs={'dropout': key}, or `model.clone(deterministic=True)` to evaluate).

  Returns:
    (model, params): the Flax module and its parameter tree, ready for `model.apply({'params': params}, ...)`.
  """
  module = _module_of(config_or_model, deterministic)
  if batch is None:
    cfg = getattr(module, "cfg", None)
    batch = families.get(getattr(cfg, "family", None) or "decoder").example_batch(cfg, (1, 8))
  rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(seed)}
  boxed = jax.jit(lambda: module.init(rngs, **families.model_inputs(module, batch))["params"])()
  return module, nn.meta.unbox(boxed)


def count_params(params: Any) -> int:
  """The number of parameters in a tree of arrays or shapes (boxed or plain, e.g. `init`'s or `jaxlm.load`'s).

  Args:
    params: the parameter tree.

  Returns:
    The sum of its leaves' sizes.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(params)))
