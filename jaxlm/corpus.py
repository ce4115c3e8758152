"""Offline text corpora: the Python standard library's own source, and user files.

The default job needs text that exists wherever Python runs, so the corpus is
the interpreter's standard library, found at run time. Paths are sorted so
enumeration is deterministic, and the train/validation split is decided per
file by a hash of its path relative to the library root, so it does not depend
on where Python is installed.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _is_test_path(rel: Path) -> bool:
  return any(part in ("test", "tests", "idle_test") for part in rel.parts)


def stdlib_files(include_tests: bool = False) -> list[Path]:
  """Sorted `.py` files of the standard library, without site-packages."""
  root = stdlib_root()
  files = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if "site-packages" in rel.parts or "__pycache__" in rel.parts:
      continue
    if not include_tests and _is_test_path(rel):
      continue
    files.append(path)
  return files


def split_of(rel_path: str, val_fraction: float) -> str:
  """'validation' for a stable `val_fraction` of paths, 'train' for the rest."""
  digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") / 2**64
  return "validation" if bucket < val_fraction else "train"


def stdlib_split(split: str, val_fraction: float, include_tests: bool = False) -> list[Path]:
  root = stdlib_root()
  return [p for p in stdlib_files(include_tests)
          if split_of(p.relative_to(root).as_posix(), val_fraction) == split]


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
  files = {}
  for pattern in patterns:
    matched = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    if not matched:
      raise FileNotFoundError(pattern)
    base = _fixed_prefix(pattern)
    for path in matched:
      files.setdefault(path.resolve(), path.resolve().relative_to(base).as_posix())
  return files


def absolute_patterns(patterns: str) -> str:
  """Comma-separated globs made absolute, so a saved run reads the same files from any folder."""
  return ",".join(os.path.abspath(pattern) for pattern in patterns.split(",")) if patterns else patterns


def _fixed_prefix(pattern: str) -> Path:
  """The folder before the first glob magic in `pattern` (a plain file's parent), resolved."""
  parts = Path(pattern).parts
  fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
  if len(fixed) == len(parts):  # no magic: a file
    fixed = fixed[:-1]
  return Path(*fixed).resolve() if fixed else Path.cwd()


def read_text_bytes(path: Path) -> bytes:
  """File bytes, with invalid UTF-8 replaced so every document is valid text."""
  return path.read_bytes().decode("utf-8", errors="replace").encode("utf-8")
