"""Reading what `jaxlm prepare` wrote: token shards, local or in a bucket, read in verified blocks.

A prepared split is a folder or a bucket prefix (layout in jaxlm/data/prepare.py)
whose `index.json` lists its shards. A shard's token data is read in blocks of
the index's `block_bytes` (64 KiB): a row asks for the blocks that hold its
`seq_len + 1` tokens, and the blocks a batch needs are fetched together, as
ranged reads (`cat_ranges`: concurrent requests on gs://, seek and read on a local
disk). Nothing else is read, so each process of a run reads only the blocks of
its own rows, and memory holds at most `CACHE_BLOCKS` blocks besides the batch.

Every block is checked when it arrives, once per process: its CRC-32 against
the one `prepare` recorded, then its token ids against the vocabulary. Every
shard's size is checked when the split is opened (one listing), a shard's
`.npy` header and its checksums file when the process first reads from it. Any
mismatch is a `PreparedDataError` naming the shard file: damaged data stops the
run instead of being trained on.

The documents lie back to back, each ending in EOS, exactly as `data.TokenStream`
lays them out, so `PreparedRows[i]` equals `data.PackedRows[i]` over the same
documents; segment boundaries come from the EOS tokens inside the row.
"""

from __future__ import annotations

import collections
import io
import json
import os
import threading
import zlib

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import packing
from jaxlm.data.prepare import FORMAT, INDEX, tokenizer_fingerprint
from jaxlm.storage import fs

CACHE_BLOCKS = 64  # verified blocks kept per split (4 MiB): rows that share a block, and in-order validation
_SHARD_KEYS = ("tokens", "checksums", "num_tokens", "header_bytes", "header_crc32", "checksums_crc32")
_REBUILD = "delete it and run the same `jaxlm prepare` again (it rebuilds the index from the finished shards)"


class PreparedDataError(ConfigError):
  """A prepared shard that is missing, cut short or damaged; the message names the file."""


def read_index(directory: str | os.PathLike, key: str = "data.prepared_dir") -> dict:
  """The index of a finished prepared split (local or gs://).

  Raises:
    ConfigError: naming `key` if it is missing or unfinished, or naming the index file if it is unreadable.
  """
  directory = os.fspath(directory)
  location = fs.join(directory, INDEX)
  if not fs.path(location).exists():
    raise ConfigError(
      f"{key}: '{directory}' holds no finished prepared split ({INDEX} is missing); run "
      "`jaxlm prepare --config CONFIG --out DIR` (an interrupted prepare resumes) and pass DIR"
    )
  try:
    index = json.loads(fs.read_bytes(location))
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ConfigError(f"{key}: '{location}' is not valid JSON (garbled or cut); {_REBUILD}") from None
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    found = index.get("format") if isinstance(index, dict) else None
    raise ConfigError(
      f"{key}: '{directory}' was written by another version of `jaxlm prepare` "
      f"(format {found!r}, expected {FORMAT!r}); prepare it again"
    )
  try:
    complete = all(isinstance(shard, dict) and all(k in shard for k in _SHARD_KEYS) for shard in index["shards"])
    complete = complete and all(k in index["tokenizer"] for k in ("eos_id", "vocab_size", "fingerprint"))
    np.dtype(index["dtype"]), int(index["block_bytes"])
  except (KeyError, TypeError):
    complete = False
  if not complete:
    raise ConfigError(f"{key}: '{location}' lacks some of its fields (garbled); {_REBUILD}")
  return index


class PreparedRows:
  """Random-access rows {inputs, targets, segment_ids, positions, weights} of one prepared split.

  `directory` is a split folder (OUT/train or OUT/validation, local or gs://);
  row i holds tokens [i * seq_len, (i + 1) * seq_len + 1) of the split's
  concatenated shards, so rows overlap by one token and every token is a
  target once. `bytes_read` counts the bytes this object fetched. Safe to read
  from several threads (grain's prefetch threads).
  """

  def __init__(self, directory: str | os.PathLike, seq_len: int, index: dict | None = None):
    import fsspec  # local: only prepared runs read through it

    self.directory = os.fspath(directory)
    self.index = index or read_index(directory)
    self.seq_len = seq_len
    self.eos_id = self.index["tokenizer"]["eos_id"]
    self.vocab_size = self.index["tokenizer"]["vocab_size"]
    self.dtype = np.dtype(self.index["dtype"])
    self.block_tokens = self.index["block_bytes"] // self.dtype.itemsize
    self.shards = self.index["shards"]
    self.paths = [fs.join(self.directory, shard["tokens"]) for shard in self.shards]
    self.offsets = np.cumsum([0] + [shard["num_tokens"] for shard in self.shards])  # first token of each shard
    self.num_rows = max(int(self.offsets[-1]) - 1, 0) // seq_len
    # Its own client, without listings: a shared gcsfs client may remember a listing from before the shards existed.
    remote = {"skip_instance_cache": True, "use_listings_cache": False} if fs.is_url(self.directory) else {}
    self.filesystem = fsspec.core.url_to_fs(self.directory, **remote)[0]
    self.bytes_read = 0
    self._check_sizes()
    self._block_sums: dict[int, np.ndarray] = {}  # shard -> its blocks' CRC-32, for the shards opened so far
    self._cache: collections.OrderedDict = collections.OrderedDict()  # (shard, block) -> tokens, oldest first
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.num_rows

  def _keys(self, start: int, stop: int) -> list[tuple[int, int]]:
    """(shard, block) of every block that holds tokens [start, stop) of the split, in order."""
    keys, shard = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
    while start < stop and shard < len(self.shards):
      first, length = int(self.offsets[shard]), self.shards[shard]["num_tokens"]
      local_start, local_stop = start - first, min(stop - first, length)
      keys += [(shard, b) for b in range(local_start // self.block_tokens, -(-local_stop // self.block_tokens))]
      start, shard = first + local_stop, shard + 1
    return keys

  def _redo(self, shard: int) -> str:
    """The fix for a damaged shard: `prepare` rewrites a shard whose completion marker is gone."""
    marker = fs.join(self.directory, self.shards[shard]["tokens"].replace(".tokens.npy", ".json"))
    return (
      f"delete '{marker}' and '{fs.join(self.directory, INDEX)}', then run the same `jaxlm prepare` again "
      "(it rewrites that shard)"
    )

  def _check_sizes(self) -> None:
    """Every shard is there with the size its index says: one listing, before anything compiles."""
    listing = self.filesystem.ls(self.directory, detail=True)
    sizes = {os.path.basename(info["name"].rstrip("/")): info["size"] for info in listing}
    for shard, (path, record) in enumerate(zip(self.paths, self.shards)):
      expected = record["header_bytes"] + record["num_tokens"] * self.dtype.itemsize
      if record["tokens"] not in sizes:
        raise PreparedDataError(f"'{path}' is missing; {self._redo(shard)}")
      if sizes[record["tokens"]] != expected:
        raise PreparedDataError(
          f"'{path}' has {sizes[record['tokens']]} bytes, its index says {expected} (cut short?); {self._redo(shard)}"
        )

  def _open_shard(self, shard: int) -> None:
    """Checks the shard's `.npy` header and loads its block checksums; once per process, at its first read."""
    path, record = self.paths[shard], self.shards[shard]
    sums_path = fs.join(self.directory, record["checksums"])
    try:
      header = self.filesystem.cat_file(path, 0, record["header_bytes"])
      sums = self.filesystem.cat_file(sums_path)
    except FileNotFoundError as e:
      raise PreparedDataError(f"'{e.filename or path}' is missing; {self._redo(shard)}") from None
    self.bytes_read += len(header) + len(sums)
    if zlib.crc32(header) != record["header_crc32"]:
      raise PreparedDataError(f"'{path}': its .npy header does not match its checksum (garbled); {self._redo(shard)}")
    if zlib.crc32(sums) != record["checksums_crc32"]:
      raise PreparedDataError(f"'{sums_path}' does not match its checksum (garbled); {self._redo(shard)}")
    self._block_sums[shard] = np.load(io.BytesIO(sums))

  def _verify(self, key: tuple[int, int], raw) -> np.ndarray:
    """The tokens of one fetched block, after checking its length, its CRC-32 and its ids."""
    shard, block = key
    path, record = self.paths[shard], self.shards[shard]
    first = block * self.block_tokens
    if isinstance(raw, Exception):  # cat_ranges returns a range's error in its place
      raise PreparedDataError(f"'{path}': cannot read tokens from {first} ({type(raw).__name__}); {self._redo(shard)}")
    length = min(self.block_tokens, record["num_tokens"] - first) * self.dtype.itemsize
    found = zlib.crc32(raw)
    recorded = int(self._block_sums[shard][block])
    if len(raw) != length or found != recorded:
      raise PreparedDataError(
        f"'{path}': tokens {first}..{first + self.block_tokens - 1} do not match their checksum "
        f"(CRC-32 {found:08x}, recorded {recorded:08x}): the shard is damaged; {self._redo(shard)}"
      )
    tokens = np.frombuffer(raw, self.dtype)
    highest = int(tokens.max()) if len(tokens) else 0
    lowest = int(tokens.min()) if len(tokens) and self.dtype.kind == "i" else 0  # uint16 ids cannot be negative
    if highest >= self.vocab_size or lowest < 0:
      bad = highest if highest >= self.vocab_size else lowest
      raise PreparedDataError(
        f"'{path}': token id {bad} is outside the vocabulary of {self.vocab_size} (tokens {first}.."
        f"{first + len(tokens) - 1}); the shard was written by another tokenizer or damaged; {self._redo(shard)}"
      )
    return tokens

  def _blocks(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """{key: tokens} of the blocks `keys`, from the cache or fetched together and verified."""
    with self._lock:
      found = {key: self._cache[key] for key in keys if key in self._cache}
      for key in found:
        self._cache.move_to_end(key)
    missing = sorted(set(keys) - found.keys())
    if not missing:
      return found
    with self._lock:  # the first reader of a shard checks it; the others wait for its verdict
      for shard in sorted({shard for shard, _ in missing} - self._block_sums.keys()):
        self._open_shard(shard)
    block_bytes = self.block_tokens * self.dtype.itemsize
    starts = [self.shards[s]["header_bytes"] + b * block_bytes for s, b in missing]
    ends = [
      min(start + block_bytes, self.shards[s]["header_bytes"] + self.shards[s]["num_tokens"] * self.dtype.itemsize)
      for start, (s, _) in zip(starts, missing)
    ]
    raws = self.filesystem.cat_ranges([self.paths[s] for s, _ in missing], starts, ends, on_error="return")
    fetched = {key: self._verify(key, raw) for key, raw in zip(missing, raws)}
    with self._lock:
      self.bytes_read += sum(len(raw) for raw in raws)
      self._cache.update(fetched)
      while len(self._cache) > CACHE_BLOCKS:
        self._cache.popitem(last=False)
    return {**found, **fetched}

  def _slice(self, blocks: dict, start: int, stop: int) -> np.ndarray:
    """int32 tokens [start, stop) of the split out of `blocks`, which hold every block they span."""
    keys = self._keys(start, stop)
    if not keys:
      return np.zeros(0, np.int32)
    shard, block = keys[0]
    first = int(self.offsets[shard]) + block * self.block_tokens
    tokens = np.concatenate([blocks[key] for key in keys], dtype=np.int32)
    return tokens[start - first : stop - first]

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """int32 tokens [start, stop) of the split, read across block and shard boundaries."""
    return self._slice(self._blocks(self._keys(start, stop)), start, stop)

  def _row(self, blocks: dict, index: int) -> packing.Batch:
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} of {self.num_rows}")
    start = int(index) * self.seq_len
    tokens = self._slice(blocks, start, start + self.seq_len + 1)
    # A document ends with its EOS, so the next token starts the next segment.
    return packing.pack_row(tokens, np.concatenate([[True], tokens[:-1] == self.eos_id]))

  def _getitems(self, indices) -> list[packing.Batch]:
    """Rows `indices`, their blocks fetched in one go (grain's batched read, used by `data.train_batches`)."""
    spans = [(int(i) * self.seq_len, (int(i) + 1) * self.seq_len + 1) for i in indices if 0 <= i < self.num_rows]
    blocks = self._blocks([key for start, stop in spans for key in self._keys(start, stop)])
    return [self._row(blocks, int(i)) for i in indices]

  def __getitem__(self, index: int) -> packing.Batch:
    return self._getitems([index])[0]

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


def open_split(directory: str | os.PathLike, tokenizer, seq_len: int, key: str = "data.prepared_dir") -> PreparedRows:
  """The rows of a prepared split folder (local or gs://), after checking it was made with `tokenizer`.

  Raises:
    ConfigError: naming `key` when the split is missing, unfinished or made with another tokenizer.
  """
  index = read_index(directory, key)
  prepared, ours = index["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
  if prepared != ours:
    raise ConfigError(
      f"{key}: '{directory}' was prepared with another tokenizer ({index['tokenizer']['kind']}, fingerprint "
      f"{prepared[:12]}) than this run's ({type(tokenizer).__name__}, {ours[:12]}); set data.tokenizer and "
      "data.tokenizer_path to the prepared ones, or run `jaxlm prepare` again with this config"
    )
  return PreparedRows(directory, seq_len, index)
