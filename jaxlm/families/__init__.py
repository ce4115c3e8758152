"""Model families, each one place: its model, batches, data, loss inputs, evaluation and decoding.

A family is a `Family` record, registered under the name `config.model.family`
selects. The built-in ones are this package's modules (`decoder.py`,
`encoder_decoder.py`, `encoder.py`); `get` imports every module here on first
use, so a fourth family is one new module in this folder, or one
`register(Family(...))` call from your own code, and touches nothing else.

This module imports no other part of jaxlm and nothing heavy, so the config
checks, the decoding loop and the model can all look families up without an
import cycle.

The model contract (`LanguageModel`) is written here too: what any Flax module
must have for `jaxlm.training.trainer.Trainer` to train it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

Batch = dict  # str -> array, batch-major (B x T, or B x S for an encoder-decoder's source)


@dataclasses.dataclass(frozen=True)
class Family:
  """What the rest of jaxlm needs from a model family. `model_cfg` is the model sub-config (`config.model`),
  `config` the whole config.

  name: the `model.family` value.
  build(model_cfg, decode, deterministic) -> nn.Module: the model; `decode=True` for cached generation.
  model_inputs(model_cfg, batch) -> dict: the keyword arguments of the model's `__call__`, from a data batch.
  example_batch(model_cfg, (B, T)) -> batch: arrays of the family's batch structure (init and tracing).
  rows(config, tokenizer, split) -> rows: random-access training or validation rows (`len`, `rows[i]` a dict
    of 1-D arrays, `padding_row()`), the family's data preparation.
  evaluate(evaluation) -> dict: the family's metrics beside its baselines, given a `jaxlm.tasks.evaluate.Evaluation`.
  training_text(config) -> iterator of str: the text a SentencePiece vocabulary is trained on.
  attention_layers(model_cfg) -> (self-attention layers, cross-attention layers), for the FLOP count;
    every self-attention layer also has an MLP.
  adapter(model_cfg, start_id) -> `jaxlm.inference.decode.Adapter`, or None if the family does not generate text.
  head: the name of the top-level parameter subtree that is the family's task head (BERT's 'mlm_head', a
    classifier's 'head'), or None; the rest is the body. A run may start from a run of another family whose
    body has the same arrays (`train.init_from`, jaxlm/training/init_from.py): the body is copied, this head starts
    from its initialization and the base's head is dropped.
  check(config): the family's own config checks, raising `jaxlm.config.ConfigError`; run by
    `jaxlm.config.validate`, which also checks that `data.source` feeds the family (`jaxlm.data.sources`).
  reads_pairs: True when the family trains on a data source's (source, target) pairs
    (`jaxlm.data.sources.Source.pairs`) rather than on its documents or rows.
  """

  name: str
  build: Callable[..., Any]
  model_inputs: Callable[[Any, Batch], dict]
  example_batch: Callable[[Any, tuple[int, int]], Batch]
  rows: Callable[[Any, Any, str], Any]
  evaluate: Callable[[Any], dict]
  training_text: Callable[[Any], Iterator[str]]
  attention_layers: Callable[[Any], tuple[int, int]]
  adapter: Optional[Callable[[Any, int], Any]] = None
  head: Optional[str] = None
  check: Optional[Callable[[Any], None]] = None
  reads_pairs: bool = False


_REGISTRY: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> Family:
  """Adds `family` under `family.name` (replacing one of that name); returns it."""
  _REGISTRY[family.name] = family
  return family


def _discover() -> None:
  """Imports every module of this package once; each registers its family."""
  global _discovered
  if _discovered:
    return
  _discovered = True
  for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{module.name}")


def names() -> tuple[str, ...]:
  """The registered family names, sorted."""
  _discover()
  return tuple(sorted(_REGISTRY))


def get(name: str) -> Family:
  """The family registered as `name`; ValueError naming the choices if there is none."""
  if name not in _REGISTRY:
    _discover()
  if name not in _REGISTRY:
    raise ValueError(f"model.family '{name}' is unknown; choose one of {', '.join(names())}")
  return _REGISTRY[name]


@runtime_checkable
class LanguageModel(Protocol):
  """The contract a Flax module meets to be trained, evaluated and checkpointed by `jaxlm.training.trainer.Trainer`.

  - `__call__(**inputs) -> logits_BxTxV`, where `inputs` are the keyword arguments `model_inputs` makes from a
    batch. For a module with a `cfg` attribute (the model sub-config, as jaxlm's own models have), they come
    from its family; for any other module they are the decoder's: `tokens_BxT`, `segment_ids_BxT` and
    `positions_BxT` (all B x T int32; segment id 0 is padding, positions restart in every packed document).
  - `deterministic: bool`, a dataclass field: the trainer builds the module with dropout as given and clones
    it with `deterministic=True` for evaluation.
  - Dropout, if any, draws from the 'dropout' rng stream. Parameters may carry logical axis names
    (`nn.with_logical_partitioning`); the config's `mesh.rules` then shard them.
  """

  deterministic: bool

  def __call__(self, *args, **kwargs) -> Any: ...


def model_inputs(model, batch: Batch) -> dict:
  """The keyword arguments for `model(...)` from a data batch, per the `LanguageModel` contract."""
  cfg = getattr(model, "cfg", None)
  family = getattr(cfg, "family", None) or "decoder"
  return get(family).model_inputs(cfg, batch)
