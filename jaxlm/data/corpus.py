"""Offline text corpora: the Python standard library's own source, and user files.

The default job needs text that exists wherever Python runs, so the corpus is
the interpreter's standard library, found at run time. Paths are sorted so
enumeration is deterministic, and the train/validation split is decided per
file by a hash of its path relative to the library root, so it does not depend
on where Python is installed.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import os
import sysconfig
from pathlib import Path

from jaxlm.errors import ConfigError
from jaxlm.storage import fs


def stdlib_root() -> Path:
  """The folder of this interpreter's standard library (the default corpus)."""
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[Path]:
  """Sorted `.py` files of the standard library, without site-packages.

  Args:
    include_tests: also the library's own test folders (`test`, `tests`, `idle_test`).

  Returns:
    The files, sorted by path.
  """
  return list(_stdlib_files(include_tests))


@functools.cache
def _stdlib_files(include_tests: bool) -> tuple[Path, ...]:
  # Listed once per process: a run asks for it per split and per data stream, and walking the library (skipped
  # folders pruned, not walked) takes a second or more on a busy machine.
  skipped = {"site-packages", "__pycache__"} | (set() if include_tests else {"test", "tests", "idle_test"})
  files = []
  for folder, subfolders, names in os.walk(stdlib_root()):
    subfolders[:] = [name for name in subfolders if name not in skipped]
    files.extend(Path(folder, name) for name in names if name.endswith(".py"))
  return tuple(sorted(files))


def split_of(rel_path: str, val_fraction: float) -> str:
  """'validation' for a stable `val_fraction` of paths, 'train' for the rest."""
  digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") / 2**64
  return "validation" if bucket < val_fraction else "train"


def stdlib_split(split: str, val_fraction: float, include_tests: bool = False) -> list[Path]:
  """Sorted standard-library files of `split` ('train' or 'validation'), split by a hash of each relative path."""
  root = stdlib_root()
  return [p for p in stdlib_files(include_tests) if split_of(p.relative_to(root).as_posix(), val_fraction) == split]


def glob_files(patterns: tuple[str, ...] | list[str]) -> list[Path]:
  """Sorted files matching any of `patterns`; raises FileNotFoundError naming the pattern."""
  return sorted(glob_files_with_keys(patterns))


def glob_files_with_keys(patterns: tuple[str, ...] | list[str]) -> dict[Path, str]:
  """{file: split key} for the files matching any of `patterns`.

  The split key is the file's path relative to its pattern's fixed leading
  folders (`corpus/**/*.txt` -> `sub/a.txt`; a plain file -> its name), so
  `data/x.txt`, `./data/x.txt` and `/abs/data/x.txt` hash into the same split
  whatever the current folder. Raises FileNotFoundError naming the pattern.
  """
  files, folders = {}, {}
  for pattern in patterns:
    if fs.is_url(pattern):  # gs://...: names are already absolute; the key is the name past the fixed prefix
      matched = fs.glob(pattern)
      if not matched:
        raise FileNotFoundError(pattern)
      base = "/".join(_fixed_parts(pattern.split("/")))
      for name in matched:
        files.setdefault(fs.path(name), name[len(base) :].lstrip("/"))
      continue
    matched = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not matched:
      raise FileNotFoundError(pattern)
    base = _fixed_prefix(pattern)
    for path in matched:
      # Resolving each folder once, not each file, keeps listing 100,000 files to about a second.
      if path.parent not in folders:
        folders[path.parent] = path.parent.resolve()
      resolved = folders[path.parent] / path.name
      files.setdefault(resolved, resolved.relative_to(base).as_posix())
  return files


def absolute_patterns(patterns: str) -> str:
  """Comma-separated globs made absolute, so a saved run reads the same files from any folder."""
  return (
    ",".join(pattern if fs.is_url(pattern) else os.path.abspath(pattern) for pattern in patterns.split(","))
    if patterns
    else patterns
  )


def _fixed_prefix(pattern: str) -> Path:
  """The folder before the first glob magic in `pattern` (a plain file's parent), resolved."""
  fixed = _fixed_parts(Path(pattern).parts)
  return Path(*fixed).resolve() if fixed else Path.cwd()


def _fixed_parts(parts) -> list[str]:
  """The parts of a pattern before the first glob magic, without the last one if none has magic (a file)."""
  fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
  return fixed[:-1] if len(fixed) == len(parts) else fixed


def read_text_bytes(path: Path) -> bytes:
  """File bytes, with invalid UTF-8 replaced so every document is valid text."""
  return path.read_bytes().decode("utf-8", errors="replace").encode("utf-8")


# A byte range [start, end) of one file: the unit in which splits and prepared shards name their text.
Range = tuple[Path, int, int]


def stdlib_ranges(data_config) -> dict[str, list[Range]]:
  """{'train': ranges, 'validation': ranges} for data.source 'stdlib': whole files, each in one split by its path."""
  return {
    split: [_whole(p) for p in stdlib_split(split, data_config.val_fraction, data_config.include_tests)]
    for split in ("train", "validation")
  }


def split_ranges(data_config) -> dict[str, list[Range]]:
  """{'train': ranges, 'validation': ranges} for data.source 'files', each in reading order.

  Each range of a text file is one document; a `.jsonl` range holds one
  document per line (see `documents`). With `data.validation_paths`,
  validation is exactly those files and training every other file. Otherwise
  each file goes to one split by a hash of its path (relative to its glob's
  fixed folders). When that leaves either split empty (one file, the common
  case), the files are cut instead: training takes the head and validation
  the last `val_fraction` of their bytes, so no byte is in both.
  Raises ConfigError when every file is empty.
  """
  keyed = glob_files_with_keys(data_config.paths.split(","))
  if data_config.validation_paths:
    validation = glob_files(data_config.validation_paths.split(","))
    held_out = set(validation)
    return {
      "train": [_whole(p) for p in sorted(keyed) if p not in held_out],
      "validation": [_whole(p) for p in validation],
    }
  by_split = {"train": [], "validation": []}
  for path in sorted(keyed):
    by_split[split_of(keyed[path], data_config.val_fraction)].append(path)
  if by_split["train"] and by_split["validation"]:
    return {split: [_whole(p) for p in paths] for split, paths in by_split.items()}
  return _cut(sorted(keyed), data_config.val_fraction, data_config.paths)


def _whole(path: Path) -> Range:
  return (path, 0, fs.size(path))


def _cut(paths: list[Path], val_fraction: float, patterns: str) -> dict[str, list[Range]]:
  """The head (train) and tail (validation) of the files' bytes taken as one sequence."""
  sizes = [fs.size(p) for p in paths]
  if not sum(sizes):
    raise ConfigError(f"data.paths: every file matching '{patterns}' is empty; add text to train on")
  cut, offset, by_split = int(sum(sizes) * (1 - val_fraction)), 0, {"train": [], "validation": []}
  for path, size in zip(paths, sizes):
    local = min(max(cut - offset, 0), size)
    if path.suffix == ".jsonl":  # a JSON line is never cut in two
      local = next_line_start(path, local)
    for split, (start, end) in (("train", (0, local)), ("validation", (local, size))):
      if end > start:
        by_split[split].append((path, start, end))
    offset += size
  return by_split


def next_line_start(path: Path, offset: int) -> int:
  """The first offset >= `offset` that starts a line of `path` (or its size)."""
  with fs.path(path).open("rb") as f:
    if offset == 0:
      return 0
    f.seek(offset - 1)
    while chunk := f.read(1 << 20):
      newline = chunk.find(b"\n")
      if newline >= 0:
        return f.tell() - len(chunk) + newline + 1
  return fs.size(path)


def documents(path: str | Path, start: int, end: int, text_key: str = "text") -> list[bytes]:
  """The UTF-8 documents in bytes [start, end) of `path` (invalid bytes replaced).

  A text file's range is one document. A `.jsonl` file holds one JSON object
  per line; each line's `text_key` string is a document (data.text_key).
  """
  # Builtin open for local files: epath's costs more than reading a small file.
  with fs.path(path).open("rb") if fs.is_url(path) else open(path, "rb") as f:
    f.seek(start)
    data = f.read(end - start)
  if not os.fspath(path).endswith(".jsonl"):
    return [data.decode("utf-8", errors="replace").encode("utf-8")]
  out = []
  for number, line in enumerate(data.splitlines()):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line)[text_key].encode("utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError):
      raise ConfigError(
        f"{path}: line {number + 1} after byte {start} is not a JSON object with a "
        f"'{text_key}' string; fix the line or set data.text_key"
      ) from None
  return out
