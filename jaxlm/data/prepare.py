"""`jaxlm prepare`: tokenize a source once into memory-mapped token shards, in parallel and resumably.

    jaxlm prepare --config CONFIG --out DIR [--split train] [--workers N] [--shard-mb 16] [--config.data.KEY=V ...]

The source and the tokenizer are the config's `data.*` keys (stdlib, files and
globs including `.jsonl` files, or tfds), so each split holds exactly the
documents `jaxlm train` would read for it: the same validation files, never a
training one. Each split goes to its own folder, DIR/train and DIR/validation:

  plan.json                  the source ranges of every shard, with the tokenizer's and source's
                             fingerprints; written first, it is what a rerun compares against
  shard_NNNNN.tokens.npy     token ids, documents back to back, each ending in EOS (uint16 when the
                             vocabulary fits, else int32); read with np.load(mmap_mode='r')
  shard_NNNNN.documents.npy  int64 end offsets (in the shard's tokens) of the documents ending in it
  shard_NNNNN.json           the shard's counts; renamed into place last, it marks the shard complete
  index.json                 totals, the shard list and both fingerprints; written once every shard is

Every file is written as NAME.tmp and renamed, so an interrupted prepare never
leaves a shard that looks complete. Running the same command again keeps the
finished shards and writes the others; if the source or tokenizer changed, it
starts the split over. The plan depends only on the source and --shard-mb, and
every shard only on its plan, so the output bytes are identical on every run
and with any number of workers. Worker processes are forked (no JAX runs in
them), each tokenizes whole shards, and they report progress to one bar.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
import tqdm

from jaxlm.config import ConfigError
from jaxlm.data import corpus, sources
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.storage import fs

FORMAT = "jaxlm-prepared-1"
INDEX = "index.json"
PLAN = "plan.json"
TFDS_EXAMPLES_PER_SHARD = 100_000


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


def _file_pieces(path: Path, start: int, end: int, shard_bytes: int) -> list[dict]:
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
  shard_bytes = max(int(shard_mb * 2**20), 1)
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


def _write_atomic(path: Path, write) -> None:
  """Calls write(file) on PATH.tmp, then renames it to `path`: readers never see a partial file."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def write_shard(job: tuple) -> dict:
  """Tokenizes one shard's segments and writes its three files; returns its counts.

  job: (split folder, shard number, segments, plan['data'], split, dtype name).
  """
  directory, number, segments, data, split, dtype = job
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
  base = Path(directory) / f"shard_{number:05d}"
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  _write_atomic(base.with_name(base.name + ".tokens.npy"), lambda f: np.save(f, tokens))
  _write_atomic(base.with_name(base.name + ".documents.npy"), lambda f: np.save(f, np.asarray(ends, np.int64)))
  counts = {
    "tokens": base.name + ".tokens.npy",
    "documents": base.name + ".documents.npy",
    "num_tokens": num_tokens,
    "num_documents": len(ends),
    "num_bytes": num_bytes,
  }
  _write_atomic(base.with_name(base.name + ".json"), lambda f: f.write(json.dumps(counts).encode()))
  return counts


# --- the driver ----------------------------------------------------------------------------------


def _clear(directory: Path) -> None:
  """Removes what a previous prepare wrote in `directory` (only its own file names)."""
  for pattern in ("shard_*", INDEX, PLAN, "*.tmp"):
    for path in directory.glob(pattern):
      path.unlink()


def _run(jobs: list[tuple], workers: int, bar: tqdm.tqdm) -> None:
  """Runs write_shard over `jobs`, in `workers` forked processes (or here when workers <= 1)."""
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
  context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
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


def prepare_split(plan: dict, directory: Path, workers: int, show_progress: bool = True) -> dict:
  """Writes the split that `plan` describes into `directory`, resuming a previous run; returns its index."""
  directory.mkdir(parents=True, exist_ok=True)
  split = plan["split"]
  plan_path = directory / PLAN
  previous = json.loads(plan_path.read_text()) if plan_path.is_file() else None
  if previous == plan and (directory / INDEX).is_file():
    return json.loads((directory / INDEX).read_text())
  if previous != plan:
    if previous is not None:
      print(
        f"{directory}: the source, tokenizer or --shard-mb changed since the last prepare; starting over",
        file=sys.stderr,
      )
    _clear(directory)
    _write_atomic(plan_path, lambda f: f.write(json.dumps(plan).encode()))
  for tmp in directory.glob("*.tmp"):  # left by an interrupted run; never complete
    tmp.unlink()
  shards = plan["shards"]
  done = {i for i in range(len(shards)) if (directory / f"shard_{i:05d}.json").is_file()}
  if done:
    print(f"{directory}: resuming, {len(done)} of {len(shards)} shards already written", file=sys.stderr)
  jobs = [
    (str(directory), i, shard, plan["data"], split, plan["dtype"]) for i, shard in enumerate(shards) if i not in done
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
  counts = [json.loads((directory / f"shard_{i:05d}.json").read_text()) for i in range(len(shards))]
  index = {key: plan[key] for key in ("format", "split", "source", "source_fingerprint", "tokenizer", "dtype")}
  index.update({total: sum(c[total] for c in counts) for total in ("num_documents", "num_tokens", "num_bytes")})
  index["shards"] = counts
  _write_atomic(directory / INDEX, lambda f: f.write(json.dumps(index, indent=1).encode()))
  return index


def prepare(
  config,
  out: str | Path,
  splits=("train", "validation"),
  workers: int = 0,
  shard_mb: float = 16.0,
  show_progress: bool = True,
) -> dict[str, dict]:
  """Tokenizes the config's source into `out`/SPLIT for each split; takes the whole config.

  workers: processes that tokenize (0: one per CPU). Returns {split: index}.
  """
  if config.data.tokenizer == "sentencepiece" and config.data.spm_vocab_size:
    from jaxlm.data import spm  # local: trains the vocabulary on the training split if it is missing

    spm.train_if_missing(config)
  tokenizer = tokenizer_lib.from_config(config.data)
  plans = make_plans(config, splits, tokenizer, shard_mb)
  return {
    split: prepare_split(plans[split], Path(out) / split, workers or os.cpu_count() or 1, show_progress)
    for split in splits
  }
