"""What the trainer accepts as data: the family's own rows, or the user's strings, rows or batches.

- None: the config's data, prepared by the family (`jaxlm.families`).
- An iterable of strings (or bytes): documents, tokenized and packed like the decoder family's text
  (`jaxlm.data.pipeline.PackedRows`: next-token rows), so they shuffle and resume exactly. Other objectives
  (masking, pairs) take rows or batches of their own.
- Random-access rows: any object with `len()` and `rows[i]` -> a dict of 1-D arrays with the family's keys
  (for the decoder: inputs, targets, segment_ids, positions, weights). Shuffled and resumed exactly.
- An iterable of ready batches: dicts of B x T numpy arrays, each this process's rows of one global batch.
  They are used in order; a resumed run skips the first `step` of them, which is exact when the iterable
  yields the same batches every time it is iterated.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Iterator

import numpy as np

from jaxlm.data import pipeline as data_lib


@dataclasses.dataclass
class Feed:
  """One split's data: `rows` (random access) or `batches` (an iterable of ready batches), never both."""

  rows: Any = None
  batches: Iterable[dict] | None = None

  def train_batches(
    self, global_batch: int, seed: int, start_step: int, num_steps: int, prefetch_threads: int = 0
  ) -> Iterator[dict]:
    """This process's batches for steps start_step .. num_steps-1."""
    if self.rows is not None:
      return data_lib.train_batches(self.rows, global_batch, seed, start_step, num_steps, prefetch_threads)
    return itertools.islice(iter(self.batches), start_step, num_steps)

  def eval_batches(self, global_batch: int, max_batches: int = 0) -> Iterator[dict]:
    """The split in order, at most `max_batches` batches (0: all)."""
    if self.rows is not None:
      return data_lib.eval_batches(self.rows, global_batch, max_batches)
    return itertools.islice(iter(self.batches), max_batches or None)


def _is_text(item) -> bool:
  return isinstance(item, (str, bytes))


def _is_batch(item) -> bool:
  return isinstance(item, dict) and all(np.ndim(value) == 2 for value in item.values())


def from_user(data, config, tokenizer, name: str) -> Feed:
  """A `Feed` from user data of any kind in the module docstring; `config` is the whole config.

  Raises TypeError naming `name` (the argument) when the data is none of them.
  """
  if _is_text(data) or isinstance(data, dict):
    raise TypeError(
      f"{name}: pass an iterable of strings, random-access rows or an iterable of batches, "
      f"not a single {type(data).__name__}"
    )
  if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
    first = data[0] if len(data) else None
    if _is_text(first):
      return Feed(rows=pack_documents(data, config, tokenizer))
    if _is_batch(first):
      return Feed(batches=data)
    return Feed(rows=data)
  iterator = iter(data)
  first = next(iterator, None)
  if _is_text(first):
    return Feed(rows=pack_documents(itertools.chain([first], iterator), config, tokenizer))
  if _is_batch(first):
    return Feed(batches=itertools.chain([first], iterator))
  raise TypeError(f"{name}: its items must be strings or dicts of B x T arrays; got {type(first).__name__}")


def pack_documents(documents: Iterable[str | bytes], config, tokenizer) -> data_lib.PackedRows:
  """Documents tokenized, each ended by EOS, and packed into rows of `config.data.seq_len` tokens."""
  encoded = [d.encode("utf-8") if isinstance(d, str) else d for d in documents]
  return data_lib.PackedRows(data_lib.TokenStream.from_documents(encoded, tokenizer), config.data.seq_len)
