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

from jaxlm.config import ConfigError
from jaxlm.data import corpus, prepare, sources
from jaxlm.data.packing import (  # the row primitives, shared with the prepared readers
  Batch,
  collate,
  pack_row,
  padding_row,
)
from jaxlm.data.tokenizer import Tokenizer


def load_documents(data_config, split: str) -> list[bytes]:
  """The raw documents of a split ('train' or 'validation'), for the text sources, all in memory.

  For corpora that do not fit, `jaxlm prepare` tokenizes them once into shards
  that `data.source='prepared'` reads (jaxlm/data/prepare.py, jaxlm/data/shards.py).
  """
  source = sources.get(data_config.source)
  if source.documents is None:
    _no_text(data_config, split)
  return source.documents(data_config, split)


def _no_text(data_config, split: str):
  raise ConfigError(
    f"data.source '{data_config.source}' has no {split} text to read here (prepared data holds "
    "tokens: give `jaxlm prepare` an existing tokenizer)"
  )


def decoder_rows(config, tokenizer: Tokenizer, split: str):
  """Random-access packed rows of `split` for the decoder family; takes the whole config.

  The one entry point from the trainer to the language-modelling data: the
  `data.source` entry (`jaxlm.data.sources`) decides here where the tokens come
  from. A source with rows of its own gives them ('prepared' reads
  checksummed shards, local or gs://, 'jsonl' whole records); the others' documents are
  tokenized in memory and packed (`PackedRows`). Raises ConfigError, before
  anything compiles, when the split cannot fill one batch.
  """
  d = config.data
  source = sources.get(d.source)
  if source.rows is not None:
    rows = source.rows(config, tokenizer, split)
  else:
    rows = PackedRows(TokenStream.from_documents(load_documents(d, split), tokenizer), d.seq_len)
  needed = config.train.global_batch_size if split == "train" else 1
  if len(rows) < needed:
    raise ConfigError(
      f"the {split} split of {source.described(d)} has {len(rows)} rows of data.seq_len={d.seq_len} "
      f"tokens, fewer than the {needed} needed; add text, or lower data.seq_len or "
      "train.global_batch_size"
    )
  return rows


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
    tokens = self.stream.tokens[start : start + self.seq_len + 1]
    docs = self.stream.document_ids[start : start + self.seq_len + 1]
    return pack_row(tokens, np.diff(docs, prepend=docs[0] - 1) != 0)


def local_rows(step: int, global_batch: int, process_index: int, process_count: int) -> range:
  """Indices, in the shuffled order, of the rows this process feeds at `step`.

  Global batch k is rows [k*G, (k+1)*G); process p holds the p-th contiguous
  slice, which is the slice `jax.make_array_from_process_local_data` expects
  when the mesh lists devices by process.
  """
  local = global_batch // process_count
  first = step * global_batch + process_index * local
  return range(first, first + local)


def train_batches(
  rows, global_batch: int, seed: int, start_step: int, num_steps: int, prefetch_threads: int = 0
) -> Iterator[Batch]:
  """This process's batches for steps start_step .. num_steps-1, read by grain."""
  if len(rows) < global_batch:
    raise ConfigError(
      f"the training split has {len(rows)} rows, fewer than one batch of {global_batch}; "
      "add data or lower train.global_batch_size"
    )
  # A mixture draws its own rows from (seed, row index); other rows get one grain shuffle per epoch.
  shuffled = rows.shuffled(seed) if hasattr(rows, "shuffled") else grain.MapDataset.source(rows).shuffle(seed=seed)
  p, n = jax.process_index(), jax.process_count()
  # grain's batched read: prepared shards fetch the blocks of a batch's rows in one go (concurrently from a bucket).
  read = shuffled._getitems if hasattr(shuffled, "_getitems") else lambda indices: [shuffled[i] for i in indices]
  batches = grain.MapDataset.range(num_steps).map(
    lambda step: collate(read(list(local_rows(step, global_batch, p, n))))
  )
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


# --- the built-in text sources (`jaxlm.data.sources`) ----------------------------------------------


def _documents_in(ranges):
  """The `Source.documents` of a file source whose splits `ranges(data_config)` lists."""
  return lambda data_config, split: [
    document
    for path, start, end in ranges(data_config)[split]
    for document in corpus.documents(path, start, end, data_config.text_key)
  ]


def _tfds_documents(data_config, split: str) -> list[bytes]:
  from jaxlm.data import tfds_data  # local: TFDS is imported only by runs that read it

  return tfds_data.load_documents(data_config, split)


def _tfds_pairs(config, split: str) -> list[tuple[str, str]]:
  from jaxlm.data import tfds_data

  return tfds_data.load_pairs(config.data, split)


def _answer_texts(data_config, split: str) -> list[bytes]:
  """The answers, which are what the loss is on (jaxlm/data/instruct.py)."""
  from jaxlm.data import instruct  # local: only jsonl runs read records

  return instruct.answer_texts(data_config, split)


def _records(config, tokenizer: Tokenizer, split: str):
  """Prompt/completion and chat records, whole examples per row."""
  from jaxlm.data import instruct

  return instruct.rows(config, tokenizer, split)


def _prepared_documents(data_config, split: str) -> list[bytes]:
  """The validation split decoded from the shards: what evaluation scores, for its compression baselines."""
  if split != "validation":
    _no_text(data_config, split)
  from jaxlm.data import mixture  # local: only prepared runs need them
  from jaxlm.data import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.from_config(data_config)
  return mixture.decoder_rows(data_config, tokenizer, split).documents(tokenizer)


def _prepared_rows(config, tokenizer: Tokenizer, split: str):
  """Prepared shards (local or gs://): a `mixture.Mixture` when `data.mixture` is set, for training."""
  from jaxlm.data import mixture  # local: the prepared readers are needed only by prepared runs

  return mixture.decoder_rows(config.data, tokenizer, split)


def _require_paths(data_config) -> None:
  if not data_config.paths:
    raise ConfigError(
      f"data.paths is empty but data.source='{data_config.source}'; pass --config.data.paths=PATH_OR_GLOB"
    )


def _check_files(config) -> None:
  """The paths are given and every glob matches (jsonl paths are globbed when read, with the same message)."""
  _require_paths(config.data)
  for key in ("paths", "validation_paths"):
    if config.data[key]:
      try:
        corpus.glob_files(config.data[key].split(","))
      except FileNotFoundError as e:
        raise ConfigError(f"data.{key}: no file matches '{e.args[0]}'; fix the path or glob") from None


def _files_segments(data_config, splits, shard_bytes: int) -> dict:
  _require_paths(data_config)
  return prepare.file_segments(corpus.split_ranges)(data_config, splits, shard_bytes)


def _check_tfds(config) -> None:
  from jaxlm import families  # local: the families registry, low; only the key check below needs it
  from jaxlm.storage import fs

  d = config.data
  if not d.tfds_name:
    raise ConfigError("data.tfds_name is empty but data.source='tfds'; pass e.g. --config.data.tfds_name=lm1b")
  if d.tfds_data_dir and not fs.path(d.tfds_data_dir).is_dir():
    raise ConfigError(
      f"data.tfds_data_dir '{d.tfds_data_dir}' does not exist; prepare the data with "
      f"`tfds build {d.tfds_name} --file_format=array_record --data_dir=DIR` (docs/datasets.md)"
    )
  if families.get(config.model.family).reads_pairs and not (d.source_key and d.target_key):
    raise ConfigError(
      "data.source_key/data.target_key are empty; a translation dataset needs both, "
      "e.g. --config.data.source_key=en --config.data.target_key=de"
    )


def _check_prepared(config) -> None:
  if not (config.data.prepared_dir or config.data.mixture):
    raise ConfigError(
      "data.source='prepared' needs --config.data.prepared_dir=DIR (from `jaxlm prepare --out DIR`) "
      "or --config.data.mixture='[(DIR, WEIGHT), ...]'"
    )


def _with_paths(name: str):
  return lambda data_config: f"data.source '{name}' (data.paths '{data_config.paths}')"


sources.register(
  sources.Source(
    name="stdlib",
    documents=_documents_in(corpus.stdlib_ranges),
    prepare=sources.Prepare(prepare.file_segments(corpus.stdlib_ranges), prepare.file_documents),
  )
)
sources.register(
  sources.Source(
    name="files",
    documents=_documents_in(corpus.split_ranges),
    check=_check_files,
    where=_with_paths("files"),
    prepare=sources.Prepare(_files_segments, prepare.file_documents),
  )
)
sources.register(
  sources.Source(
    name="tfds",
    documents=_tfds_documents,
    pairs=_tfds_pairs,
    check=_check_tfds,
    prepare=sources.Prepare(prepare.tfds_segments, prepare.tfds_documents, unit=" docs"),
  )
)
sources.register(
  sources.Source(
    name="jsonl",
    documents=_answer_texts,
    rows=_records,
    families=("decoder",),
    check=lambda config: _require_paths(config.data),
    where=_with_paths("jsonl"),
    description="prompt/completion and chat records",
  )
)
sources.register(
  sources.Source(
    name="prepared",
    documents=_prepared_documents,
    rows=_prepared_rows,
    families=("decoder",),
    check=_check_prepared,
    where=lambda data_config: "the prepared data (data.prepared_dir, data.mixture)",
  )
)
