"""Sequence-to-sequence data: (source, target) text pairs -> packed rows for `model.EncoderDecoder`.

Each pair becomes source ids + EOS and target ids + EOS, truncated to the
row lengths (data.seq_len for the source, data.target_len or seq_len for the
target). Training rows pack consecutive pairs greedily until either side is
full; pair k of a row has segment id k on both sides, so its target attends
to its own source only (the model's cross mask) and positions restart at 0.
The decoder input of a pair is BOS followed by its target shifted right.
Evaluation rows hold one pair each, which beam search needs.

Batch keys are documented in `jaxlm.model`.
"""

from __future__ import annotations

import numpy as np

from jaxlm import codesum, tfds_data
from jaxlm.config import Config
from jaxlm.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def load_pairs(config: Config, split: str) -> list[tuple[str, str]]:
  """The split's (source, target) text pairs from `config.data.source` (codesum or tfds); whole config."""
  d = config.data
  if d.source == "codesum":
    pairs = [(p.source, p.summary) for p in codesum.load_pairs(split, d.val_fraction, d.include_tests)]
    return pairs[:d.max_examples] if d.max_examples else pairs
  if d.source == "tfds":
    return tfds_data.load_pairs(d, split)
  raise ValueError(f"data.source '{d.source}' has no (source, target) pairs; use codesum or tfds")


def _ids(text: str, tokenizer: Tokenizer, max_len: int) -> np.ndarray:
  return np.append(tokenizer.encode(text)[:max_len - 1], np.int32(tokenizer.eos_id)).astype(np.int32)


class Seq2SeqRows:
  """Random-access rows of (source, target) pairs; `pack=False` gives one pair per row."""

  def __init__(self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, source_len: int, target_len: int,
               pack: bool = True):
    self.seq_len, self.target_len, self.bos_id = source_len, target_len, tokenizer.bos_id
    self.references = [target for _, target in pairs]
    self.examples = [(_ids(s, tokenizer, source_len), _ids(t, tokenizer, target_len)) for s, t in pairs]
    self.row_examples = _pack(self.examples, source_len, target_len) if pack else [[i] for i in
                                                                                    range(len(self.examples))]

  def __len__(self) -> int:
    return len(self.row_examples)

  def __getitem__(self, index: int) -> Batch:
    row = self.padding_row()
    source_at = target_at = 0
    for segment, example in enumerate(self.row_examples[int(index)], start=1):
      source, target = self.examples[example]
      s, t = slice(source_at, source_at + len(source)), slice(target_at, target_at + len(target))
      row["inputs"][s], row["input_segment_ids"][s], row["input_positions"][s] = source, segment, np.arange(len(source))
      row["targets"][t], row["segment_ids"][t], row["positions"][t] = target, segment, np.arange(len(target))
      row["decoder_inputs"][t] = np.concatenate([[self.bos_id], target[:-1]])
      row["weights"][t] = 1.0
      source_at, target_at = s.stop, t.stop
    return row

  def padding_row(self) -> Batch:
    """A row of weight 0 (source and target all padding), to fill the last evaluation batch."""
    source = lambda: np.zeros(self.seq_len, np.int32)
    target = lambda: np.zeros(self.target_len, np.int32)
    return {"inputs": source(), "input_segment_ids": source(), "input_positions": source(),
            "decoder_inputs": target(), "targets": target(), "segment_ids": target(), "positions": target(),
            "weights": np.zeros(self.target_len, np.float32)}


def _pack(examples, source_len: int, target_len: int) -> list[list[int]]:
  """Consecutive examples per row, a new row whenever either side would overflow."""
  rows, current, used_source, used_target = [], [], 0, 0
  for i, (source, target) in enumerate(examples):
    if current and (used_source + len(source) > source_len or used_target + len(target) > target_len):
      rows.append(current)
      current, used_source, used_target = [], 0, 0
    current.append(i)
    used_source += len(source)
    used_target += len(target)
  if current:
    rows.append(current)
  return rows


def prepare(config: Config, tokenizer: Tokenizer, split: str, pack: bool | None = None) -> Seq2SeqRows:
  """Rows of a split; training rows are packed, validation rows hold one pair each unless `pack` says."""
  pack = split == "train" if pack is None else pack
  d = config.data
  return Seq2SeqRows(load_pairs(config, split), tokenizer, d.seq_len, d.target_len or d.seq_len, pack)
