"""`jaxlm prepare`: tokenize a source once into checksummed token shards, local or gs://, in parallel, resumably.

    jaxlm prepare --config CONFIG --out DIR [--split train] [--workers N] [--shard-mb 16] [--config.data.KEY=V ...]

The source and the tokenizer are the config's `data.*` keys (stdlib, files and
globs including `.jsonl` files, or tfds), so each split holds exactly the
documents `jaxlm train` would read for it: the same validation files, never a
training one. Each split goes to its own folder, DIR/train and DIR/validation:

  plan.json                  the source ranges of every shard, with the tokenizer's and source's
                             fingerprints; written first, it is what a rerun compares against
  shard_NNNNN.tokens.npy     token ids, documents back to back, each ending in EOS (uint16 when the
                             vocabulary fits, else int32), in the `.npy` layout
  shard_NNNNN.documents.npy  int64 end offsets (in the shard's tokens) of the documents ending in it
  shard_NNNNN.checksums.npy  uint32 CRC-32 of each `BLOCK_BYTES` block of the token data
  shard_NNNNN.json           the shard's counts and the CRC-32 of the tokens' `.npy` header and of the
                             checksums file; written last, it marks the shard complete
  index.json                 totals, the shard list and both fingerprints; written once every shard is

DIR may be local or a bucket (`gs://bucket/data`); every file goes through
`jaxlm.storage.fs`. A local file is written beside its target and renamed, and
a bucket object appears whole or not at all, so an interrupted prepare never
leaves a shard that looks complete. Running the same command again keeps the
finished shards and writes the others; if the source or tokenizer changed, it
starts the split over.

Checksums: CRC-32, the algorithm of the checkpoints' file manifest
(`jaxlm.storage.integrity`), but per block rather than per file: a block is
also the unit the reader fetches (jaxlm/data/shards.py), so a process that
reads a few rows of a bucket fetches and verifies only the blocks that hold
them, never a whole shard. The block checksums live beside each shard (4 bytes
per 64 KiB, read with the shard), not in `index.json`, which every process
reads whole and which stays small at C4 scale.

The plan depends only on the source and --shard-mb, and every shard only on
its plan, so the output bytes are identical on every run and with any number
of workers. Worker processes are forked (spawned when DIR is a bucket, whose
client refuses to run in a fork; no JAX runs in them), each tokenizes whole
shards, and they report progress to one bar.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import time
import zlib
from typing import Any, Callable

import ml_collections
import numpy as np
import tqdm

from jaxlm.config import ConfigError
from jaxlm.data import corpus, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.storage import fs

FORMAT = "jaxlm-prepared-2"  # 2: per-block checksums
INDEX = "index.json"
PLAN = "plan.json"
TFDS_EXAMPLES_PER_SHARD = 100_000
BLOCK_BYTES = 1 << 16  # checksum and read unit of the token data: 32,768 uint16 tokens


def tokenizer_fingerprint(tokenizer) -> str:
  """A hex digest naming the tokenizer: its kind and special ids, and its model file's bytes if it has one."""
  digest = hashlib.sha256(
    json.dumps(
      [type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]
    ).encode()
  )
  model_path = getattr(tokenizer, "model_path", None)
  if model_path is not None:
    digest.update(fs.read_bytes(model_path))  # local or gs://
  return digest.hexdigest()


def _file_pieces(path: os.PathLike, start: int, end: int, shard_bytes: int) -> list[dict]:
  """A file range as segments of at most about `shard_bytes`, cut at line starts.

  Every JSON line is a document. A text range is one document, so only its
  last piece ends it (gets the EOS); pieces are tokenized apart, which for
  SentencePiece may tokenize the few characters at a cut differently.
  """
  pieces, jsonl = [], path.suffix == ".jsonl"
  while True:
    cut = corpus.next_line_start(path, start + shard_bytes) if end - start > shard_bytes else end
    cut = min(cut, end)
    pieces.append({"path": str(path), "start": start, "end": cut, "ends_document": jsonl or cut == end})
    if cut >= end:
      return pieces
    start = cut


def _segments(data_config, splits, shard_bytes: int) -> dict[str, tuple[list[dict], str]]:
  """{split: (its segments in reading order, the source's fingerprint)} for each of `splits`.

  The source's `Prepare.segments` names them (see `jaxlm.data.sources.Prepare`);
  the fingerprint hashes what they name, so a changed source restarts the
  prepare instead of resuming.
  """
  source = sources.get(data_config.source)
  if source.prepare is None:
    choices = sources.offering("prepare")
    raise ConfigError(
      f"data.source='{data_config.source}' cannot be prepared; use {', '.join(choices[:-1])} or {choices[-1]}"
    )
  out = source.prepare.segments(data_config, splits, shard_bytes)
  return {
    split: (segments, hashlib.sha256(json.dumps(described).encode()).hexdigest())
    for split, (segments, described) in out.items()
  }


def file_segments(ranges: Callable[[Any], dict[str, list[corpus.Range]]]) -> Callable[..., dict]:
  """`Prepare.segments` of a file source whose splits `ranges(data_config)` lists (e.g. `corpus.split_ranges`).

  Args:
    ranges: the source's {split: file ranges} of a data sub-config.

  Returns:
    segments(data_config, splits, shard_bytes) -> {split: (segments {path, start, end, ends_document} of about
    `shard_bytes`, [path, start, end, size, mtime] of each range)}; it raises ConfigError when a glob matches no
    file.
  """

  def segments(data_config, splits, shard_bytes: int) -> dict[str, tuple[list[dict], list]]:
    try:
      split_ranges = ranges(data_config)  # one listing for both splits
    except FileNotFoundError as e:
      raise ConfigError(
        f"data.paths or data.validation_paths: no file matches '{e.args[0]}'; fix the path or glob"
      ) from None
    out = {}
    for split in splits:
      pieces, described = [], []
      for path, start, end in split_ranges[split]:
        described.append([str(path), start, end, *_size_and_mtime(path)])
        pieces += _file_pieces(path, start, end, shard_bytes)
      out[split] = pieces, described
    return out

  return segments


def tfds_segments(data_config, splits, shard_bytes: int) -> dict[str, tuple[list[dict], list]]:
  """`Prepare.segments` of the TFDS source: example ranges of `TFDS_EXAMPLES_PER_SHARD` (`shard_bytes` unused).

  Args:
    data_config: the data sub-config.
    splits: the splits to name.
    shard_bytes: unused; a TFDS segment is a shard.

  Returns:
    {split: (segments {tfds: [first, end]}, [name, split name, data dir, examples])}.
  """
  from jaxlm.data import tfds_data  # local: TFDS is imported only when it is the source

  out = {}
  for split in splits:
    count = tfds_data.num_examples(data_config, split)
    out[split] = (
      [
        {"tfds": [first, min(first + TFDS_EXAMPLES_PER_SHARD, count)]}
        for first in range(0, count, TFDS_EXAMPLES_PER_SHARD)
      ],
      [data_config.tfds_name, tfds_data.split_name(data_config, split), data_config.tfds_data_dir, count],
    )
  return out


def _size_and_mtime(path) -> list:
  """[size, modification time] of a local or gs:// file, for the source fingerprint."""
  if fs.is_url(path):
    stat = fs.path(path).stat()
    return [stat.length, stat.mtime]
  stat = os.stat(path)
  return [stat.st_size, stat.st_mtime_ns]


def _group(segments: list[dict], shard_bytes: int) -> list[list[dict]]:
  """Consecutive segments grouped into shards of about `shard_bytes` (a TFDS segment is a shard)."""
  shards, size = [], 0
  for segment in segments:
    length = segment["end"] - segment["start"] if "path" in segment else shard_bytes
    if not shards or (size and size + length > shard_bytes):
      shards.append([])
      size = 0
    shards[-1].append(segment)
    size += length
  return shards


def make_plans(config, splits, tokenizer, shard_mb: float) -> dict[str, dict]:
  """{split: what `prepare` writes for it (JSON-ready)}; equal plans give identical output."""
  shard_bytes = int(shard_mb * 2**20)
  plans = {}
  for split, (segments, source_fingerprint) in _segments(config.data, splits, shard_bytes).items():
    plans[split] = {
      "format": FORMAT,
      "split": split,
      "source": config.data.source,
      "source_fingerprint": source_fingerprint,
      "tokenizer": {
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "fingerprint": tokenizer_fingerprint(tokenizer),
      },
      "dtype": "uint16" if tokenizer.vocab_size <= 2**16 else "int32",
      "block_bytes": BLOCK_BYTES,
      "data": {
        key: config.data[key]
        for key in (
          "source",
          "tokenizer",
          "tokenizer_path",
          "text_key",
          "tfds_name",
          "tfds_data_dir",
          "tfds_train_split",
          "tfds_eval_split",
        )
      },
      "shards": _group(segments, shard_bytes),
    }
  return plans  # JSON values only (dicts, lists, str, int, bool), so it compares equal to plan.json read back


# --- the workers ---------------------------------------------------------------------------------

_progress = None  # in a worker: the queue progress goes to; in-process: a callback
_tokenizers = {}


def _init_worker(progress_queue) -> None:
  global _progress
  _progress = progress_queue.put


def _tokenizer(data: dict):
  key = json.dumps(data, sort_keys=True)
  if key not in _tokenizers:
    _tokenizers[key] = tokenizer_lib.from_config(ml_collections.ConfigDict(data))
  return _tokenizers[key]


def file_documents(segment: dict, data_config, split: str) -> tuple[list[bytes], int]:
  """`Prepare.documents` of the file sources: (the segment's documents, its size in bytes)."""
  return corpus.documents(segment["path"], segment["start"], segment["end"], data_config.text_key), segment[
    "end"
  ] - segment["start"]


def tfds_documents(segment: dict, data_config, split: str) -> tuple[list[bytes], int]:
  """`Prepare.documents` of the TFDS source: (the segment's documents, its number of examples)."""
  from jaxlm.data import tfds_data  # local: TFDS is imported only when it is the source

  first, end = segment["tfds"]
  return tfds_data.load_documents(data_config, split, first, end), end - first


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def checksums(npy: bytes, data_bytes: int, block_bytes: int) -> tuple[dict, bytes]:
  """The checksums of a `.npy` file's bytes whose array takes `data_bytes`.

  Args:
    npy: the whole file.
    data_bytes: the array's size in bytes (the file's tail).
    block_bytes: the block size.

  Returns:
    ({'header_bytes', 'header_crc32', 'checksums_crc32'} for the shard's json, the checksums file's bytes).
  """
  header = len(npy) - data_bytes
  data = memoryview(npy)[header:]
  blocks = _npy_bytes(
    np.asarray([zlib.crc32(data[start : start + block_bytes]) for start in range(0, len(data), block_bytes)], np.uint32)
  )
  return {
    "header_bytes": header,
    "header_crc32": zlib.crc32(npy[:header]),
    "checksums_crc32": zlib.crc32(blocks),
  }, blocks


def write_shard(job: tuple) -> dict:
  """Tokenizes one shard's segments and writes its three files; returns its counts.

  job: (split folder, shard number, segments, plan['data'], split, dtype name, block bytes).
  """
  directory, number, segments, data, split, dtype, block_bytes = job
  tokenizer = _tokenizer({key: data[key] for key in ("tokenizer", "tokenizer_path")})
  pieces, ends, num_tokens, num_bytes = [], [], 0, 0
  for segment in segments:
    documents, units = sources.get(data["source"]).prepare.documents(segment, ml_collections.ConfigDict(data), split)
    start_tokens = num_tokens
    for i, document in enumerate(documents):
      tokens = tokenizer.encode(document)
      if segment.get("ends_document", True) or i < len(documents) - 1:
        tokens = np.append(tokens, np.int32(tokenizer.eos_id))
        ends.append(num_tokens + len(tokens))
      pieces.append(tokens.astype(dtype))
      num_tokens += len(tokens)
      num_bytes += len(document)
    if _progress:
      _progress((units, len(documents), num_tokens - start_tokens))
  name = f"shard_{number:05d}"
  tokens = _npy_bytes(np.concatenate(pieces) if pieces else np.zeros(0, dtype))
  fs.write_bytes(fs.join(directory, name + ".tokens.npy"), tokens)
  fs.write_bytes(fs.join(directory, name + ".documents.npy"), _npy_bytes(np.asarray(ends, np.int64)))
  sums, blocks = checksums(tokens, num_tokens * np.dtype(dtype).itemsize, block_bytes)
  fs.write_bytes(fs.join(directory, name + ".checksums.npy"), blocks)
  counts = {
    "tokens": name + ".tokens.npy",
    "documents": name + ".documents.npy",
    "checksums": name + ".checksums.npy",
    "num_tokens": num_tokens,
    "num_documents": len(ends),
    "num_bytes": num_bytes,
    **sums,
  }
  fs.write_text(fs.join(directory, name + ".json"), json.dumps(counts))
  return counts


# --- the driver ----------------------------------------------------------------------------------


def _clear(directory: str) -> None:
  """Removes what a previous prepare wrote in `directory` (only its own file names)."""
  for pattern in ("shard_*", INDEX, PLAN, "*.tmp"):
    for location in fs.glob(fs.join(directory, pattern)):
      fs.path(location).unlink()


def _leftovers(directory: str) -> list[str]:
  """Partial files an interrupted local prepare left (`fs.write_bytes`'s, and the `.tmp` of older versions)."""
  return fs.glob(fs.join(directory, "*.partial-*")) + fs.glob(fs.join(directory, "*.tmp"))


def _run(jobs: list[tuple], workers: int, bar: tqdm.tqdm) -> None:
  """Runs write_shard over `jobs`, in `workers` worker processes (or here when workers <= 1)."""
  global _progress
  documents, tokens, started = 0, 0, time.perf_counter()

  def report(update):
    nonlocal documents, tokens
    units, new_documents, new_tokens = update
    documents, tokens = documents + new_documents, tokens + new_tokens
    bar.set_postfix_str(
      f"{documents:,} docs, {tokens / max(time.perf_counter() - started, 1e-9):,.0f} tokens/s", refresh=False
    )
    bar.update(units)

  if workers <= 1 or len(jobs) <= 1:
    _progress = report
    try:
      for job in jobs:
        write_shard(job)
    finally:
      _progress = None
    return
  # Forked workers start at once, but a bucket's client (gcsfs, already used here) refuses to run in a fork.
  remote = fs.is_url(jobs[0][0])
  fork = "fork" in multiprocessing.get_all_start_methods() and not remote
  context = multiprocessing.get_context("fork" if fork else "spawn")
  # A SimpleQueue's put writes before returning, so once the jobs are done every report is readable.
  progress_queue = context.SimpleQueue()
  with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(progress_queue,)) as pool:
    result = pool.map_async(write_shard, jobs, chunksize=1)
    while not result.ready() or not progress_queue.empty():
      if progress_queue.empty():
        result.wait(0.1)
      else:
        report(progress_queue.get())
    result.get()  # re-raises a worker's error here


def _read_json(location: str, what: str):
  """The JSON file `location`; raises ConfigError naming it when it is not JSON (a garbled or cut file)."""
  try:
    return json.loads(fs.read_bytes(location))
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ConfigError(f"'{location}' ({what}) is not valid JSON; delete it and run `jaxlm prepare` again") from None


def prepare_split(plan: dict, directory: str, workers: int, show_progress: bool = True) -> dict:
  """Writes the split that `plan` describes into `directory` (local or gs://), resuming a previous run.

  Returns:
    The split's index (what `index.json` holds).
  """
  fs.makedirs(directory)
  split = plan["split"]
  plan_path, index_path = fs.join(directory, PLAN), fs.join(directory, INDEX)
  previous = _read_json(plan_path, "the plan of an earlier prepare") if fs.path(plan_path).exists() else None
  if previous == plan and fs.path(index_path).exists():
    return _read_json(index_path, "the index of the prepared split")
  if previous != plan:
    if previous is not None:
      print(
        f"{directory}: the source, tokenizer or --shard-mb changed since the last prepare; starting over",
        file=sys.stderr,
      )
    _clear(directory)
    fs.write_text(plan_path, json.dumps(plan))
  for leftover in _leftovers(directory):  # left by an interrupted run; never complete
    fs.path(leftover).unlink()
  shards = plan["shards"]
  marks = {os.path.basename(location) for location in fs.glob(fs.join(directory, "shard_*.json"))}
  done = {i for i in range(len(shards)) if f"shard_{i:05d}.json" in marks}
  if done:
    print(f"{directory}: resuming, {len(done)} of {len(shards)} shards already written", file=sys.stderr)
  jobs = [
    (directory, i, shard, plan["data"], split, plan["dtype"], plan["block_bytes"])
    for i, shard in enumerate(shards)
    if i not in done
  ]
  size = lambda shard: sum(s["end"] - s["start"] if "path" in s else s["tfds"][1] - s["tfds"][0] for s in shard)
  with tqdm.tqdm(
    total=sum(map(size, shards)),
    initial=sum(size(shards[i]) for i in done),
    unit=sources.get(plan["source"]).prepare.unit,
    unit_scale=True,
    desc=f"prepare {split}",
    disable=not show_progress,
    dynamic_ncols=True,
  ) as bar:
    _run(jobs, workers, bar)
  counts = [_read_json(fs.join(directory, f"shard_{i:05d}.json"), "a shard's counts") for i in range(len(shards))]
  index = {
    key: plan[key] for key in ("format", "split", "source", "source_fingerprint", "tokenizer", "dtype", "block_bytes")
  }
  index.update({total: sum(c[total] for c in counts) for total in ("num_documents", "num_tokens", "num_bytes")})
  index["shards"] = counts
  fs.write_text(index_path, json.dumps(index, indent=1))
  return index


def _check_out(out: str) -> None:
  """Raises ConfigError naming --out when it is a file, or a local folder that cannot be created; StorageError
  naming the bucket when a gs:// one is missing or not writable."""
  fs.check_access(out, write=True)
  if fs.path(out).is_file():
    raise ConfigError(f"--out '{out}' is a file; pass a folder (local or gs://bucket/path) for the prepared splits")
  try:
    fs.makedirs(out)
  except OSError as e:
    raise ConfigError(f"--out '{out}': cannot create the folder ({e.strerror or type(e).__name__}); pass another")


def prepare(
  config,
  out: str | os.PathLike,
  splits=("train", "validation"),
  workers: int = 0,
  shard_mb: float = 16.0,
  show_progress: bool = True,
) -> dict[str, dict]:
  """Tokenizes the config's source into `out`/SPLIT for each split; takes the whole config.

  Args:
    config: the whole config; its `data` section names the source and the tokenizer.
    out: the output folder, local or `gs://bucket/path`.
    splits: the splits to prepare.
    workers: processes that tokenize (0: one per CPU).
    shard_mb: megabytes of source text per shard; positive.
    show_progress: whether to show a progress bar.

  Returns:
    {split: index}.
  """
  if not (math.isfinite(shard_mb) and shard_mb >= 0.001):
    raise ConfigError(f"--shard-mb must be a number of megabytes of at least 0.001 (e.g. 16); got {shard_mb}")
  out = os.fspath(out)
  _check_out(out)
  if config.data.tokenizer == "sentencepiece" and config.data.spm_vocab_size:
    from jaxlm.data import spm  # local: trains the vocabulary on the training split if it is missing

    spm.train_if_missing(config)
  tokenizer = tokenizer_lib.from_config(config.data)
  plans = make_plans(config, splits, tokenizer, shard_mb)
  return {
    split: prepare_split(plans[split], fs.join(out, split), workers or os.cpu_count() or 1, show_progress)
    for split in splits
  }
