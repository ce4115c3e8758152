"""Offline code summarization: stdlib function source -> first docstring line.

Every `def` / `async def` in the interpreter's standard library (methods and
nested functions included) that has a docstring gives one pair: its source with
the docstring removed, and the first non-empty line of the docstring. The data
exists wherever Python runs, so the encoder-decoder job needs no download.

Splits are decided per file with `corpus.split_of`, the same hash the language
model corpus uses, so (a) no file's functions straddle train and validation and
(b) a model pretrained on `corpus.stdlib_split('train', f)` has not seen the
files behind this dataset's validation split for the same `f`. A third 'test'
split is deliberately absent: carving it out of the hash range would put files
the LM trains on into it, breaking (b).

Measured 2026-11-28, Python 3.11.7, defaults (val_fraction=0.05,
include_tests=False, max_source_chars=2000), on a busy 2-CPU machine:
  extraction: 734 files -> 6637 pairs in 2.7 s CPU (5.4 s wall), cached
  train: 6117 pairs; validation: 216 pairs from 18 files
  (252 sources over 2000 chars dropped; 5 validation pairs dropped because a
  train file has the same source verbatim)
  validation BLEU: most_common ('Emit a record.') 0.07, name_words 0.14
  with include_tests=True: 8170 pairs, train 7405, validation 358, 9.9 s CPU
Both baselines are near zero: BLEU's brevity penalty crushes 1-3 word guesses
against ~8-word references. With 216 examples from 18 files, validation BLEU
is noisy; raise val_fraction (0.2 -> 946 pairs from 76 files) to compare models.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import re
import textwrap
import tokenize
import warnings
from pathlib import Path

import sacrebleu

from jaxlm.data import corpus
from jaxlm.tasks import python_source

SPLITS = ("train", "validation")
MIN_SUMMARY_WORDS = 3


@dataclasses.dataclass(frozen=True)
class Pair:
  """One summarization example: a standard-library function and the first line of its docstring."""

  source: str  # the function's source, dedented, without its own docstring
  summary: str  # first non-empty line of the docstring, stripped
  name: str  # qualified name, e.g. 'json.decoder.JSONDecoder.decode'
  path: str  # posix path relative to the stdlib root


def module_name(rel_path: str) -> str:
  """'json/decoder.py' -> 'json.decoder'; a package's __init__.py -> the package."""
  parts = list(Path(rel_path).with_suffix("").parts)
  if len(parts) > 1 and parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _decode(data: bytes) -> str | None:
  # Honour PEP 263 coding cookies (turtledemo/clock.py is cp1252) instead of
  # corpus.read_text_bytes, whose replacement characters would end up in the
  # targets; undecodable files are skipped.
  try:
    encoding, _ = tokenize.detect_encoding(_line_reader(data))
    text = data.decode(encoding)
  except (SyntaxError, LookupError, UnicodeDecodeError):
    return None
  text = text.removeprefix("\ufeff")
  # Column offsets are per line, so normalizing newlines keeps them valid and
  # lets the splicing below assume '\n'.
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_reader(data: bytes):
  lines = iter(data.splitlines(keepends=True))
  return lambda: next(lines, b"")


def _source_without_docstring(lines: list[bytes], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """The function's text (decorators included) with the docstring statement cut out.

  Splicing the original text keeps comments and formatting that `ast.unparse`
  would drop; unparse is only the fallback when the splice does not reparse.
  """
  start = (node.lineno, node.col_offset)
  if node.decorator_list:  # a decorator's position is its expression's, after the '@'
    decorator = node.decorator_list[0]
    start = (decorator.lineno, lines[decorator.lineno - 1].rindex(b"@", 0, decorator.col_offset))
  docstring = node.body[0]
  head = python_source.segment(lines, start, (docstring.lineno, docstring.col_offset), padded=True)
  tail = python_source.segment(
    lines, (docstring.end_lineno, docstring.end_col_offset), (node.end_lineno, node.end_col_offset)
  )
  head_code = head.rstrip(" \t")
  indent = head[len(head_code) :]
  rest = tail.lstrip(" \t")
  if rest.startswith(";"):  # `"""doc"""; more()` on one line
    rest = rest[1:].lstrip(" \t")
  if not rest:  # docstring-only body (abstract methods): keep the def valid
    spliced = head_code + indent + "pass"
  elif rest.startswith("\n"):  # the usual case: docstring on lines of its own
    spliced = head_code + rest[1:] if head_code.endswith("\n") else head_code + rest
  else:  # code or a comment followed the docstring on its last line
    spliced = head_code + indent + rest
  source = textwrap.dedent(spliced)
  try:
    ast.parse(source)
    return source
  except SyntaxError:
    # e.g. a method holding a multi-line string at column 0 defeats dedent.
    stripped = ast.parse(ast.unparse(node)).body[0]
    stripped.body = stripped.body[1:] or [ast.Pass()]
    return ast.unparse(stripped)


def _first_line(docstring: str) -> str:
  for line in docstring.splitlines():
    if line.strip():
      return line.strip()
  return ""


# Definitions only occur in statement lists, so the walk skips expressions,
# which are most of the tree (and of the time a full ast.walk would take).
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _functions(node: ast.AST, prefix: tuple[str, ...]):
  """(qualified-name parts, node) for every function, in source order."""
  for block in _BLOCKS:
    for child in getattr(node, block, ()):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield prefix + (child.name,), child
        yield from _functions(child, prefix + (child.name,))
      elif isinstance(child, ast.ClassDef):
        yield from _functions(child, prefix + (child.name,))
      else:  # functions under if/try/with/match at any depth
        yield from _functions(child, prefix)


def extract_pairs(path, rel_path: str) -> list[Pair]:
  """Pairs for every documented function in one file; [] if it cannot be read or parsed."""
  text = _decode(Path(path).read_bytes())
  if text is None:
    return []
  try:
    with warnings.catch_warnings():  # invalid escapes etc. in old code
      warnings.simplefilter("ignore")
      tree = ast.parse(text)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return []
  lines = python_source.lines_of(text)
  module = module_name(rel_path)
  pairs = []
  for parts, node in _functions(tree, (module,) if module else ()):
    docstring = ast.get_docstring(node, clean=True)
    summary = _first_line(docstring or "")
    # pickletools' readers open with a doctest prompt, which is not a summary.
    if len(summary.split()) < MIN_SUMMARY_WORDS or summary.startswith(">>>"):
      continue
    pairs.append(
      Pair(source=_source_without_docstring(lines, node), summary=summary, name=".".join(parts), path=rel_path)
    )
  return pairs


@functools.lru_cache(maxsize=None)
def _stdlib_pairs(include_tests: bool) -> tuple[tuple[str, tuple[Pair, ...]], ...]:
  root = corpus.stdlib_root()
  by_file = []
  for path in corpus.stdlib_files(include_tests):
    rel_path = path.relative_to(root).as_posix()
    by_file.append((rel_path, tuple(extract_pairs(path, rel_path))))
  return tuple(by_file)


def load_pairs(
  split: str, val_fraction: float = 0.05, include_tests: bool = False, max_source_chars: int = 2000
) -> list[Pair]:
  """Deduplicated pairs of the stdlib files hashed into `split`, in file order.

  Identical (source, summary) pairs are kept once. A few functions are copied
  verbatim between modules, so validation also drops any source that train
  already has: otherwise BLEU would partly measure memorization.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  train_sources = set()
  if split == "validation":
    train_sources = {pair.source for pair in load_pairs("train", val_fraction, include_tests, max_source_chars)}
  pairs, seen = [], set()
  for rel_path, file_pairs in _stdlib_pairs(include_tests):
    if corpus.split_of(rel_path, val_fraction) != split:
      continue
    for pair in file_pairs:
      key = (pair.source, pair.summary)
      if len(pair.source) > max_source_chars or key in seen or pair.source in train_sources:
        continue
      seen.add(key)
      pairs.append(pair)
  return pairs


_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def name_words(name: str) -> str:
  """'pkg.Cls.read_file_header' -> 'Read file header'; 'parseHTTPDate' -> 'Parse http date'."""
  words = [word.lower() for word in _WORD.findall(name.rsplit(".", 1)[-1])]
  if not words:
    return name
  words[0] = words[0].capitalize()
  return " ".join(words)


def baseline_predictions(train: list[Pair], eval_pairs: list[Pair]) -> dict[str, list[str]]:
  """Trivial lower bounds any trained model must beat."""
  if not train:
    raise ValueError("baseline_predictions needs a non-empty train set")
  counts = collections.Counter(pair.summary for pair in train)
  # Ties broken alphabetically so the baseline does not depend on train order.
  most_common = min(counts, key=lambda summary: (-counts[summary], summary))
  return {
    "most_common": [most_common] * len(eval_pairs),
    "name_words": [name_words(pair.name) for pair in eval_pairs],
  }


def bleu(predictions: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu defaults, 13a tokenization), 0-100."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  return sacrebleu.corpus_bleu(predictions, [references]).score
