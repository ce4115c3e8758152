"""Reading what `jaxlm prepare` wrote: memory-mapped token shards, packed into rows on demand.

A prepared split is a folder (layout in jaxlm/data/prepare.py) whose `index.json`
lists its shards. The shards are `.npy` token arrays opened with
`np.load(mmap_mode='r')`: nothing is read until a row asks for its tokens,
so memory does not grow with the corpus and each process touches only the
pages of its own rows. The documents lie back to back, each ending in EOS,
exactly as `data.TokenStream` lays them out, so `PreparedRows[i]` equals
`data.PackedRows[i]` over the same documents; segment boundaries come from
the EOS tokens inside the row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import packing
from jaxlm.data.prepare import FORMAT, INDEX, tokenizer_fingerprint


def read_index(directory: str | Path, key: str = "data.prepared_dir") -> dict:
  """The index of a finished prepared split; raises ConfigError naming `key` if it is missing or unfinished."""
  if str(directory).startswith("gs:/"):  # also gs:// as pathlib folds it (callers join with Path)
    raise ConfigError(
      f"{key}: '{directory}' is a bucket, but prepared shards are memory-mapped from a local disk; "
      f"copy them first (`gcloud storage cp -r {directory} DIR`) and pass DIR"
    )
  path = Path(directory) / INDEX
  if not path.is_file():
    raise ConfigError(
      f"{key}: '{directory}' holds no finished prepared split ({INDEX} is missing); run "
      "`jaxlm prepare --config CONFIG --out DIR` (an interrupted prepare resumes) and pass DIR"
    )
  index = json.loads(path.read_text())
  if index.get("format") != FORMAT:
    raise ConfigError(
      f"{key}: '{directory}' was written by another version of `jaxlm prepare` "
      f"(format {index.get('format')!r}, expected {FORMAT!r}); prepare it again"
    )
  return index


class PreparedRows:
  """Random-access rows {inputs, targets, segment_ids, positions, weights} of one prepared split.

  `directory` is a split folder (OUT/train or OUT/validation); row i holds
  tokens [i * seq_len, (i + 1) * seq_len + 1) of the split's concatenated
  shards, so rows overlap by one token and every token is a target once.
  """

  def __init__(self, directory: str | Path, seq_len: int, index: dict | None = None):
    self.directory = Path(directory)
    self.index = index or read_index(directory)
    self.seq_len = seq_len
    self.eos_id = self.index["tokenizer"]["eos_id"]
    # Plain ndarray views of the maps: slicing an np.memmap costs more than reading the row.
    self.shards = [
      np.load(self.directory / shard["tokens"], mmap_mode="r").view(np.ndarray) for shard in self.index["shards"]
    ]
    self.offsets = np.cumsum([0] + [len(tokens) for tokens in self.shards])  # first token of each shard
    self.num_rows = max(int(self.offsets[-1]) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self.num_rows

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """int32 tokens [start, stop) of the split, read across shard boundaries."""
    pieces, shard = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
    while start < stop:
      local = start - int(self.offsets[shard])
      piece = self.shards[shard][local : local + stop - start]
      pieces.append(piece)
      start += len(piece)
      shard += 1
    return np.concatenate(pieces, dtype=np.int32)

  def __getitem__(self, index: int) -> packing.Batch:
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} of {self.num_rows}")
    start = int(index) * self.seq_len
    tokens = self.tokens(start, start + self.seq_len + 1)
    # A document ends with its EOS, so the next token starts the next segment.
    return packing.pack_row(tokens, np.concatenate([[True], tokens[:-1] == self.eos_id]))

  def documents(self, tokenizer) -> list[bytes]:
    """Every document of the split decoded back to UTF-8, all in memory (for validation's compression baselines).

    Exact for the byte tokenizer; SentencePiece gives its normalized text.
    """
    tokens = self.tokens(0, int(self.offsets[-1]))
    ends = np.flatnonzero(tokens == self.eos_id)
    return [
      tokenizer.decode(tokens[start:end]).encode("utf-8")
      for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends)
    ]


def open_split(directory: str | Path, tokenizer, seq_len: int, key: str = "data.prepared_dir") -> PreparedRows:
  """The rows of a prepared split folder, after checking it was made with `tokenizer`; raises ConfigError."""
  index = read_index(directory, key)
  prepared, ours = index["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
  if prepared != ours:
    raise ConfigError(
      f"{key}: '{directory}' was prepared with another tokenizer ({index['tokenizer']['kind']}, fingerprint "
      f"{prepared[:12]}) than this run's ({type(tokenizer).__name__}, {ours[:12]}); set data.tokenizer and "
      "data.tokenizer_path to the prepared ones, or run `jaxlm prepare` again with this config"
    )
  return PreparedRows(directory, seq_len, index)
