"""Data: documents -> tokens -> packed rows -> per-process batches (grain).

Packing concatenates the split's documents (each ending in EOS) into one
stream and cuts it into rows of `seq_len + 1` tokens that overlap by one, so
every token is a target exactly once and no row needs padding. A document cut
by a row boundary continues as a new segment in the next row. Segment ids
(1, 2, ... within a row) keep documents from attending to each other, and
positions restart at 0 in every segment.

The row order is a grain `MapDataset` shuffle, which draws a new permutation
each epoch from (seed, epoch). Batch k is a pure function of (seed, k), so
the data position saved in a checkpoint is just the step number, and resuming
is exact with any number of reader threads or processes.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import numpy as np

from jaxlm import corpus
from jaxlm.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def load_documents(data_config, split: str) -> list[bytes]:
  """The raw documents of a split ('train' or 'validation'), for the text sources."""
  if data_config.source == "stdlib":
    paths = corpus.stdlib_split(split, data_config.val_fraction, data_config.include_tests)
  elif data_config.source == "files":
    return _file_documents(data_config, split)
  elif data_config.source == "tfds":
    from jaxlm import tfds_data  # local: TFDS is imported only by runs that read it
    return tfds_data.load_documents(data_config, split)
  else:
    raise ValueError(f"data.source '{data_config.source}' has no text documents")
  return [corpus.read_text_bytes(p) for p in paths]


def decoder_rows(config, tokenizer: Tokenizer, split: str) -> "PackedRows":
  """Random-access packed rows of `split` for the decoder family; takes the whole config.

  The one entry point from the trainer to the language-modelling data: each
  `data.source` decides here where the tokens come from.
  """
  documents = load_documents(config.data, split)
  return PackedRows(TokenStream.from_documents(documents, tokenizer), config.data.seq_len)


def _file_documents(data_config, split: str) -> list[bytes]:
  """Documents of `data.paths`, split so that no training byte is also a validation byte.

  With `data.validation_paths`, validation is exactly those files and training
  is every other file of `data.paths`. Otherwise each file goes to one split by
  a hash of its path (relative to its glob's fixed folders). When that leaves
  either split empty (one file, the common case), the concatenated text is
  cut instead: training takes the head and validation the last `val_fraction`.
  """
  keyed = corpus.glob_files_with_keys(data_config.paths.split(","))
  if data_config.validation_paths:
    validation = corpus.glob_files(data_config.validation_paths.split(","))
    paths = validation if split == "validation" else [p for p in sorted(keyed) if p not in set(validation)]
    return [corpus.read_text_bytes(p) for p in paths]
  by_split = {"train": [], "validation": []}
  for path in sorted(keyed):
    by_split[corpus.split_of(keyed[path], data_config.val_fraction)].append(path)
  if by_split["train"] and by_split["validation"]:
    return [corpus.read_text_bytes(p) for p in by_split[split]]
  text = b"".join(corpus.read_text_bytes(p) for p in sorted(keyed))
  cut = int(len(text) * (1 - data_config.val_fraction))
  return [text[:cut]] if split == "train" else [text[cut:]]


@dataclasses.dataclass
class TokenStream:
  """All documents of a split as one token array, with each token's document index."""
  tokens: np.ndarray
  document_ids: np.ndarray
  num_bytes: int  # UTF-8 bytes of the split's text, for compression baselines

  @classmethod
  def from_documents(cls, documents: list[bytes], tokenizer: Tokenizer) -> "TokenStream":
    pieces = [np.append(tokenizer.encode(doc), np.int32(tokenizer.eos_id)) for doc in documents]
    tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    document_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
    return cls(tokens, document_ids, sum(len(d) for d in documents))


class PackedRows:
  """Random-access rows {inputs, targets, segment_ids, positions, weights}, each of length seq_len."""

  def __init__(self, stream: TokenStream, seq_len: int):
    self.stream, self.seq_len = stream, seq_len
    self.num_rows = max(len(stream.tokens) - 1, 0) // seq_len

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, index: int) -> Batch:
    start = int(index) * self.seq_len
    tokens = self.stream.tokens[start:start + self.seq_len + 1]
    docs = self.stream.document_ids[start:start + self.seq_len + 1]
    return pack_row(tokens, docs)


def pack_row(tokens: np.ndarray, document_ids: np.ndarray) -> Batch:
  """One row from seq_len+1 tokens and their document ids."""
  segments = (document_ids - document_ids[0] + 1).astype(np.int32)
  starts = np.flatnonzero(np.diff(segments, prepend=-1))
  positions = np.arange(len(tokens)) - np.repeat(starts, np.diff(np.append(starts, len(tokens))))
  return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "segment_ids": segments[:-1],
      "positions": positions[:-1].astype(np.int32),
      # The first token of the next document is not predictable from this one.
      "weights": (segments[1:] == segments[:-1]).astype(np.float32),
  }


def collate(rows: list[Batch]) -> Batch:
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def padding_row(seq_len: int) -> Batch:
  zeros = np.zeros(seq_len, np.int32)
  return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
          "weights": np.zeros(seq_len, np.float32)}


def local_rows(step: int, global_batch: int, process_index: int, process_count: int) -> range:
  """Indices, in the shuffled order, of the rows this process feeds at `step`.

  Global batch k is rows [k*G, (k+1)*G); process p holds the p-th contiguous
  slice, which is the slice `jax.make_array_from_process_local_data` expects
  when the mesh lists devices by process.
  """
  local = global_batch // process_count
  first = step * global_batch + process_index * local
  return range(first, first + local)


def train_batches(rows, global_batch: int, seed: int, start_step: int, num_steps: int,
                  prefetch_threads: int = 0) -> Iterator[Batch]:
  """This process's batches for steps start_step .. num_steps-1, read by grain."""
  if len(rows) < global_batch:
    raise ValueError(f"the training split has {len(rows)} rows, fewer than one batch of {global_batch}; "
                     "add data or lower train.global_batch_size")
  shuffled = grain.MapDataset.source(rows).shuffle(seed=seed)
  p, n = jax.process_index(), jax.process_count()
  batches = grain.MapDataset.range(num_steps).map(
      lambda step: collate([shuffled[i] for i in local_rows(step, global_batch, p, n)]))
  read_options = grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=max(2 * prefetch_threads, 1))
  return iter(batches[start_step:].to_iter_dataset(read_options))


def eval_batches(rows, global_batch: int, max_batches: int = 0) -> Iterator[Batch]:
  """The split in order; the last batch is filled with weight-0 padding rows."""
  p, n = jax.process_index(), jax.process_count()
  # Row types of other families (seq2seq, MLM) bring their own padding row.
  pad = rows.padding_row() if hasattr(rows, "padding_row") else padding_row(rows.seq_len)
  num_batches = -(-len(rows) // global_batch)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  for step in range(num_batches):
    yield collate([rows[i] if i < len(rows) else pad for i in local_rows(step, global_batch, p, n)])
