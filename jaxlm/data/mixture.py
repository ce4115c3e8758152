"""Several prepared sources mixed by weight, with the data position still the step.

`data.mixture` names prepared folders and weights as a Python literal:
`"[('/data/web', 0.7), ('/data/code', 0.3)]"` (weights are normalized).
Global row r (batch k holds rows k*G .. k*G + G - 1) comes from source s with
probability w_s, drawn from a counter-based hash of (seed, r), and is row r of
source s's own grain shuffle, which draws a new permutation each time r passes
another multiple of the source's length. Both are pure functions of (seed, r),
so batch k is a function of (seed, k) with any number of processes or reader
threads, and resuming needs only the step. Each source is read at the global
row position, so over one pass of its length it gives about w_s of its rows,
none twice; the realized shares are reported by `realized_proportions`.
"""

from __future__ import annotations

import ast
import math
import os
import zlib

import grain
import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import shards as prepared
from jaxlm.storage import fs

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment


def parse(text: str) -> list[tuple[str, float]]:
  """`data.mixture` -> [(directory, weight), ...]; raises ConfigError naming the key."""
  try:
    pairs = ast.literal_eval(text)
    pairs = [(str(directory), float(weight)) for directory, weight in pairs]
  except (ValueError, SyntaxError, TypeError):
    raise ConfigError(
      f"data.mixture must be a list of (prepared folder, weight) pairs, e.g. "
      f"\"[('data/web', 0.7), ('data/code', 0.3)]\"; got {text!r}"
    ) from None
  if not pairs or not all(math.isfinite(weight) and weight > 0 for _, weight in pairs):
    raise ConfigError(f"data.mixture needs at least one source and positive, finite weights; got {text!r}")
  return pairs


def _uniform(seed: int, rows: np.ndarray) -> np.ndarray:
  """A uniform [0, 1) number per row index: the splitmix64 hash of (seed, row), vectorized."""
  x = rows.astype(np.uint64) * np.uint64(_GOLDEN_GAMMA) + np.uint64((seed + 1) * _GOLDEN_GAMMA % 2**64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


class Mixture:
  """Training rows drawn from several sources (each random-access rows with `seq_len`) by weight."""

  def __init__(self, sources: list, weights: list[float], names: list[str]):
    self.sources, self.names, self.seq_len = sources, names, sources[0].seq_len
    # Scaled by the largest first, so that weights near the float maximum (1e308) sum without overflowing.
    scaled = np.asarray(weights, np.float64) / max(weights)
    self.cumulative = np.cumsum(scaled) / np.sum(scaled)

  def __len__(self) -> int:
    return sum(len(source) for source in self.sources)

  def source_of(self, seed: int, rows: np.ndarray) -> np.ndarray:
    """The source index of each global row index in `rows` (int array)."""
    return np.minimum(np.searchsorted(self.cumulative, _uniform(seed, rows), side="right"), len(self.sources) - 1)

  def shuffled(self, seed: int) -> "_MixedOrder":
    """Global row index -> row, for `data.train_batches`: a pure function of (seed, index)."""
    return _MixedOrder(self, seed)

  def realized_proportions(self, seed: int, first_step: int, end_step: int, global_batch: int) -> dict[str, float]:
    """{'mixture/NAME': share of the rows of global batches first_step .. end_step-1 drawn from NAME}."""
    rows = np.arange(first_step * global_batch, end_step * global_batch)
    counts = np.bincount(self.source_of(seed, rows), minlength=len(self.sources))
    return {f"mixture/{name}": float(count) / max(len(rows), 1) for name, count in zip(self.names, counts)}


class _MixedOrder:
  def __init__(self, mixture: Mixture, seed: int):
    self.mixture, self.seed = mixture, seed
    # Each source its own seed, so two sources of equal length are not read in the same order.
    self.orders = [
      grain.MapDataset.source(source).shuffle(seed=zlib.crc32(f"{seed}/{i}".encode()))
      for i, source in enumerate(mixture.sources)
    ]

  def __getitem__(self, index: int):
    source = int(self.mixture.source_of(self.seed, np.asarray([index]))[0])
    return self.orders[source][index]


class Concatenated:
  """Several row sets one after another (the validation splits of a mixture's sources)."""

  def __init__(self, parts: list):
    self.parts, self.seq_len = parts, parts[0].seq_len
    self.starts = np.cumsum([0] + [len(part) for part in parts])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: int):
    part = int(np.searchsorted(self.starts, index, side="right")) - 1
    return self.parts[part][index - int(self.starts[part])]

  def documents(self, tokenizer) -> list[bytes]:
    """The parts' documents, decoded (see `prepared.PreparedRows.documents`)."""
    return [document for part in self.parts for document in part.documents(tokenizer)]


def realized_proportions(rows, seed: int, first_step: int, end_step: int, global_batch: int) -> dict[str, float]:
  """For the trainer's metrics: a mixture's realized shares over steps [first_step, end_step); {} for other rows."""
  if not isinstance(rows, Mixture):
    return {}
  return rows.realized_proportions(seed, first_step, end_step, global_batch)


def decoder_rows(data_config, tokenizer, split: str):
  """The rows of `split` for data.source='prepared': takes the data sub-config.

  Training reads `data.mixture` when set, else `data.prepared_dir`/train.
  Validation reads `data.prepared_dir`/validation when set, else every mixture
  source's own validation split, one after another: prepared validation
  splits hold only the files that `jaxlm prepare` assigned to validation, so
  nothing from training is scored.
  """
  seq_len = data_config.seq_len
  if data_config.prepared_dir and not (split == "train" and data_config.mixture):
    return prepared.open_split(fs.join(data_config.prepared_dir, split), tokenizer, seq_len)
  pairs = parse(data_config.mixture)
  parts = [prepared.open_split(fs.join(directory, split), tokenizer, seq_len, "data.mixture") for directory, _ in pairs]
  if split != "train":
    return Concatenated(parts)
  for (directory, _), part in zip(pairs, parts):
    if not len(part):
      raise ConfigError(
        f"data.mixture: '{directory}/train' has no row of data.seq_len={seq_len} tokens; "
        "drop it from the mixture or lower data.seq_len"
      )
  names = [os.path.basename(directory.rstrip("/")) or directory for directory, _ in pairs]
  names = [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]
  return Mixture(parts, [weight for _, weight in pairs], names)
