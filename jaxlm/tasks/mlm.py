"""BERT's masked-language-model data: packed rows -> masked inputs, original targets.

Of the real tokens in a row (not padding, EOS or other specials),
round(mlm_probability * count) are chosen; of those 80% become [MASK], 10% a
random real token and 10% stay unchanged (Devlin et al., 2019, section 3.1).
Only chosen tokens carry loss weight. The mask is a function of
(data.mlm_seed, row index), so it is identical whichever step, worker or
process reads the row, and resumed runs stay exact.
"""

from __future__ import annotations

import collections

import numpy as np

from jaxlm.config import Config
from jaxlm.data import pipeline as data_lib
from jaxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def mask_tokens(
  tokens_T: np.ndarray,
  maskable_T: np.ndarray,
  rng: np.random.Generator,
  probability: float,
  mask_id: int,
  random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs_T, weights_T): BERT's 80/10/10 corruption of a chosen share of the maskable tokens."""
  candidates = np.flatnonzero(maskable_T)
  count = min(len(candidates), max(1, int(round(probability * len(candidates))))) if len(candidates) else 0
  chosen = rng.permutation(candidates)[:count]
  inputs_T, weights_T = tokens_T.copy(), np.zeros(len(tokens_T), np.float32)
  weights_T[chosen] = 1.0
  action = rng.random(count)
  inputs_T[chosen[action < 0.8]] = mask_id
  randomized = chosen[(action >= 0.8) & (action < 0.9)]
  inputs_T[randomized] = rng.choice(random_ids, size=len(randomized))
  return inputs_T, weights_T


class MlmRows:
  """`data.PackedRows` with BERT masking: {inputs, targets, segment_ids, positions, weights}."""

  def __init__(self, rows: data_lib.PackedRows, tokenizer: Tokenizer, probability: float, seed: int):
    self.rows, self.probability, self.seed = rows, probability, seed
    self.seq_len = rows.seq_len
    self.mask_id = tokenizer.mask_id
    real = tokenizer.byte_lengths() > 0  # tokens that stand for text; specials have no bytes
    self.is_real_V = real
    self.random_ids = np.flatnonzero(real).astype(np.int32)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> Batch:
    row = dict(self.rows[index])
    tokens_T = row["inputs"]
    maskable_T = self.is_real_V[tokens_T] & (row["segment_ids"] != 0)
    rng = np.random.default_rng([self.seed, int(index)])
    row["inputs"], row["weights"] = mask_tokens(
      tokens_T, maskable_T, rng, self.probability, self.mask_id, self.random_ids
    )
    row["targets"] = tokens_T
    return row

  def padding_row(self) -> Batch:
    """A row of weight 0, to fill the last evaluation batch."""
    return data_lib.padding_row(self.seq_len)


def prepare(config: Config, tokenizer: Tokenizer, split: str) -> MlmRows:
  """The split's masked rows, per the whole `config` (data.seq_len, data.mlm_probability, data.mlm_seed)."""
  stream = data_lib.TokenStream.from_documents(data_lib.load_documents(config.data, split), tokenizer)
  return MlmRows(
    data_lib.PackedRows(stream, config.data.seq_len), tokenizer, config.data.mlm_probability, config.data.mlm_seed
  )


def unigram_token(rows: MlmRows) -> int:
  """The most common real token of a split (ties: lowest id): the unigram baseline's only guess."""
  tokens = rows.rows.stream.tokens
  counts = np.bincount(tokens[rows.is_real_V[tokens]], minlength=len(rows.is_real_V))
  return int(np.argmax(counts))


def unigram_accuracy(rows: MlmRows, token: int, max_rows: int = 0) -> float:
  """Share of the masked targets in `rows` (the first max_rows, 0: all) equal to `token`."""
  totals = collections.Counter()
  for i in range(min(len(rows), max_rows) if max_rows else len(rows)):
    row = rows[i]
    totals["hit"] += float(np.sum((row["targets"] == token) * row["weights"]))
    totals["all"] += float(np.sum(row["weights"]))
  return totals["hit"] / max(totals["all"], 1.0)
