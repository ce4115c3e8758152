"""Packed rows: the dict-of-arrays row type and the functions that build, pad and batch rows.

A leaf module, so every row reader (in-memory `data`, memory-mapped
`prepared`, mixtures) shares one definition without importing each other.
"""

from __future__ import annotations

import numpy as np

Batch = dict[str, np.ndarray]


def pack_row(tokens: np.ndarray, starts: np.ndarray) -> Batch:
  """One row from seq_len+1 tokens; `starts` (bool, same length) is True where a token begins a document.

  starts[0] must be True: the row's first token begins its first segment.
  """
  index = np.arange(len(tokens), dtype=np.int32)
  segments = np.cumsum(starts, dtype=np.int32)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0))
  return {
    "inputs": tokens[:-1],
    "targets": tokens[1:],
    "segment_ids": segments[:-1],
    "positions": positions[:-1],
    # The first token of the next document is not predictable from this one.
    "weights": (~starts[1:]).astype(np.float32),
  }


def collate(rows: list[Batch]) -> Batch:
  """Rows of equal-length arrays stacked into one batch: each key becomes [len(rows), ...]."""
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def padding_row(seq_len: int) -> Batch:
  """A row of `seq_len` zeros with weight 0, to fill the last evaluation batch."""
  zeros = np.zeros(seq_len, np.int32)
  return {
    "inputs": zeros,
    "targets": zeros,
    "segment_ids": zeros,
    "positions": zeros,
    "weights": np.zeros(seq_len, np.float32),
  }


def head_padding_row(seq_len: int, num_targets: int, token_keys=("inputs", "segment_ids", "positions")) -> Batch:
  """A row of weight 0 for a task head's rows, to fill the last evaluation batch.

  Args:
    seq_len: the row's length in tokens.
    num_targets: targets per row (a class label: 1; an answer span's start and end: 2).
    token_keys: the per-token arrays the rows carry.

  Returns:
    Writable zero arrays: `seq_len` int32 for each of `token_keys`, `num_targets` int32 targets and float32 weights.
  """
  row = {key: np.zeros(seq_len, np.int32) for key in token_keys}
  row["targets"] = np.zeros(num_targets, np.int32)
  row["weights"] = np.zeros(num_targets, np.float32)
  return row
