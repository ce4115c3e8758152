"""Data sources, the registry that `data.source` names: each source is one `Source` entry.

An entry holds everything jaxlm knows about one kind of data: how to read its
training and validation documents, (source, target) pairs or rows; what
`jaxlm prepare` reads from it; the model families it feeds; and its own config
checks, which `jaxlm.config.validate` runs. A family reads the kind of data it
trains on from the entry (documents for a language model, pairs for an
encoder-decoder, rows in the source's own layout for a task), so no module
compares `data.source` to a name.

The built-in sources register themselves in the modules that read them
(`BUILT_IN`); `get` and `names` import those on first use, so a new source is
one `register(Source(...))` call from your own code and touches nothing else.

This module imports nothing of jaxlm but `jaxlm.errors`, so the config checks
can consult it without importing the data stack.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

from jaxlm.errors import ConfigError

# The modules that register the built-in sources, imported at first use.
BUILT_IN = ("jaxlm.data.pipeline", "jaxlm.tasks.seq2seq", "jaxlm.tasks.squad", "jaxlm.tasks.classify")


@dataclasses.dataclass(frozen=True)
class Prepare:
  """What `jaxlm prepare` reads from a source (jaxlm/data/prepare.py).

  segments(data_config, splits, shard_bytes) -> {split: (segments, described)}: each split's segments in
    reading order, JSON dicts that name a part of the source (a file range {path, start, end, ends_document}
    of about `shard_bytes`, or TFDS example indices {tfds: [first, end]}), and a JSON-ready description of
    what they name, hashed into the source's fingerprint so that a changed source restarts the prepare.
  documents(segment, data_config, split) -> (documents, units): one segment's documents (bytes), and its size
    in progress units.
  unit: the progress bar's unit: 'B' (bytes) or ' docs'.
  """

  segments: Callable[[Any, tuple[str, ...], int], dict]
  documents: Callable[[dict, Any, str], tuple[list[bytes], int]]
  unit: str = "B"


@dataclasses.dataclass(frozen=True)
class Source:
  """One `data.source` value and how to read it. `data_config` is the data sub-config, `config` the whole config.

  name: the `data.source` value.
  documents(data_config, split) -> list of bytes: the split's text documents ('train' or 'validation'), which
    a language model packs into rows; None if the source holds no text.
  pairs(config, split) -> list of (source text, target text): the split's pairs, for an encoder-decoder (or a
    decoder trained prompt -> completion when the source has no documents); None if it has none.
  rows(config, tokenizer, split) -> rows: random-access rows in the source's own layout (`len`, `rows[i]` a
    dict of 1-D arrays), which the families in `families` read instead of building rows from documents.
  families: the `model.family` values it feeds; empty: any family that reads its documents or pairs.
  prepare: what `jaxlm prepare` reads from it; None if it cannot be prepared.
  check(config): its own config checks, raising ConfigError; run by `jaxlm.config.validate`.
  labels: a classification source's label names, in label order.
  baselines(config, count) -> {name: texts}: trivial predictions for the first `count` validation pairs, scored
    beside the model's (BLEU); None: copying the source text is the baseline.
  where(data_config) -> str: where its rows come from, for messages; None: "data.source 'NAME'".
  description: what it holds, for messages, e.g. 'prompt/completion and chat records'.
  """

  name: str
  documents: Optional[Callable[[Any, str], list[bytes]]] = None
  pairs: Optional[Callable[[Any, str], list[tuple[str, str]]]] = None
  rows: Optional[Callable[[Any, Any, str], Any]] = None
  families: tuple[str, ...] = ()
  prepare: Optional[Prepare] = None
  check: Optional[Callable[[Any], None]] = None
  labels: tuple[str, ...] = ()
  baselines: Optional[Callable[[Any, int], dict[str, list[str]]]] = None
  where: Optional[Callable[[Any], str]] = None
  description: str = ""

  def described(self, data_config) -> str:
    """Where this source's rows come from, for a message, e.g. "data.source 'files' (data.paths 'a/*.txt')".

    Args:
      data_config: the data sub-config.

    Returns:
      One phrase naming the source and the keys that locate it.
    """
    return self.where(data_config) if self.where is not None else f"data.source '{self.name}'"


_REGISTRY: dict[str, Source] = {}
_discovered = False


def register(source: Source) -> Source:
  """Adds a source under its name, replacing one of that name.

  Args:
    source: the entry.

  Returns:
    `source`.
  """
  _REGISTRY[source.name] = source
  return source


def _discover() -> None:
  """Imports the modules of `BUILT_IN` once; each registers its sources."""
  global _discovered
  if _discovered:
    return
  _discovered = True
  for module in BUILT_IN:
    importlib.import_module(module)


def names() -> tuple[str, ...]:
  """The registered source names.

  Returns:
    The names, sorted.
  """
  _discover()
  return tuple(sorted(_REGISTRY))


def get(name: str) -> Source:
  """The source registered as `name`.

  Args:
    name: a `data.source` value.

  Returns:
    Its `Source`.

  Raises:
    ConfigError: no source has that name; the message lists the choices.
  """
  if name not in _REGISTRY:
    _discover()
  if name not in _REGISTRY:
    raise ConfigError(f"config key 'data.source' is '{name}'; choose one of {', '.join(names())}")
  return _REGISTRY[name]


def check(config) -> None:
  """The checks of the whole `config`'s data source: its own (`Source.check`), then that it feeds model.family.

  Args:
    config: the whole config.

  Raises:
    ConfigError: naming the key at fault and the fix.
  """
  source = get(config.data.source)
  if source.check is not None:
    source.check(config)
  if source.families and config.model.family not in source.families:
    what = f" ({source.description})" if source.description else ""
    raise ConfigError(
      f"data.source='{source.name}'{what} feeds the {' or '.join(source.families)} family, not "
      f"model.family='{config.model.family}'"
    )


def offering(field: str) -> tuple[str, ...]:
  """The sources that have one kind of reader, for messages that list the choices.

  Args:
    field: a `Source` field, e.g. 'pairs', 'prepare' or 'labels'.

  Returns:
    The names, sorted, of the registered sources where that field is set.
  """
  return tuple(name for name in names() if getattr(_REGISTRY[name], field))
