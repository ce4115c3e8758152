"""Offline classification: which top-level standard-library package a function comes from.

Every `def` / `async def` (methods and nested functions included) in the files of ten packages of the running
interpreter's standard library (`PACKAGES`, test folders excluded) is one example: its source text, labelled
with the package. The data exists wherever Python runs, so the task needs no download.

Splits are decided per function by a hash of its qualified name (`corpus.split_of`, `data.val_fraction`), not
per file as in `jaxlm.tasks.codesum`: three of the packages (json, logging, concurrent) have so few files that a file
split leaves them out of validation. Functions of one file can therefore fall on both sides; sources that
appear verbatim in train are dropped from validation.

Baselines (`baseline_predictions`): the majority class of the training split, and multinomial naive Bayes on
the bag of identifier words (lower-cased `\\w+` runs), Laplace-smoothed, written in numpy.

Rows (`ClassificationRows`): `inputs` = BOS, the source's tokens (cut to fit), EOS, then padding (1-D, seq_len);
`segment_ids` 1 on the tokens; `positions`; `targets` = [label] and `weights` = [1] (1-D, length 1): the
classification head's logits are B x 1 x C, so the trainer's cross-entropy scores them unchanged.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from jaxlm.data import corpus, packing, sources
from jaxlm.tasks import python_source

PACKAGES = (
  "asyncio",
  "concurrent",
  "email",
  "http",
  "importlib",
  "json",
  "logging",
  "multiprocessing",
  "unittest",
  "xml",
)
SPLITS = ("train", "validation")
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Example:
  """One function: its source text, its package's index in `PACKAGES` and its qualified name."""

  source: str
  label: int
  name: str


def _functions(tree: ast.AST, text: str, prefix: str):
  lines = python_source.lines_of(text)  # split once per file: `ast.get_source_segment` splits it per function
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
      source = python_source.segment(lines, (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset))
      if source:
        yield f"{prefix}:{node.lineno}:{node.name}", source


@functools.lru_cache(maxsize=None)
def _all_examples() -> tuple[Example, ...]:
  examples = []
  for path in corpus.stdlib_files(include_tests=False):
    rel = path.relative_to(corpus.stdlib_root()).as_posix()
    package = rel.split("/")[0]
    if package not in PACKAGES:
      continue
    try:
      text = path.read_text(encoding="utf-8")
      tree = ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
      continue
    examples.extend(Example(source, PACKAGES.index(package), name) for name, source in _functions(tree, text, rel))
  return tuple(examples)


def load_examples(split: str, val_fraction: float) -> list[Example]:
  """The split's examples in file order, identical sources kept once (and, in validation, none that train has)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  chosen = [e for e in _all_examples() if corpus.split_of(e.name, val_fraction) == split]
  excluded = set()
  if split == "validation":
    excluded = {e.source for e in _all_examples() if corpus.split_of(e.name, val_fraction) == "train"}
  seen, result = set(), []
  for example in chosen:
    if example.source in seen or example.source in excluded:
      continue
    seen.add(example.source)
    result.append(example)
  return result


class ClassificationRows:
  """Random-access rows of (text, label) examples for a sequence-classification head; see the module doc."""

  def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer, seq_len: int):
    self.texts, self.labels, self.tokenizer, self.seq_len = list(texts), list(labels), tokenizer, seq_len

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    body = [int(i) for i in self.tokenizer.encode(self.texts[index])][: self.seq_len - 2]
    ids = [self.tokenizer.bos_id, *body, self.tokenizer.eos_id]
    row = self.padding_row()
    row["inputs"][: len(ids)] = ids
    row["segment_ids"][: len(ids)] = 1
    row["positions"][: len(ids)] = np.arange(len(ids))
    row["targets"][0], row["weights"][0] = self.labels[index], 1.0
    return row

  def padding_row(self) -> dict[str, np.ndarray]:
    """A row of weight 0, to fill the last evaluation batch."""
    return packing.head_padding_row(self.seq_len, num_targets=1)


def stdlib_rows(config, tokenizer, split: str) -> ClassificationRows:
  """The stdlib-package task's rows for `split`, per the whole `config` (data.seq_len, data.val_fraction)."""
  examples = load_examples(split, config.data.val_fraction)
  return ClassificationRows([e.source for e in examples], [e.label for e in examples], tokenizer, config.data.seq_len)


def _bags(texts: Sequence[str], vocabulary: dict[str, int]) -> np.ndarray:
  counts_NxW = np.zeros((len(texts), len(vocabulary)), np.float64)
  for n, text in enumerate(texts):
    for word, count in collections.Counter(_WORD.findall(text.lower())).items():
      if word in vocabulary:
        counts_NxW[n, vocabulary[word]] = count
  return counts_NxW


def naive_bayes(
  train_texts: Sequence[str], train_labels: Sequence[int], texts: Sequence[str], num_classes: int, alpha: float = 1.0
) -> np.ndarray:
  """Multinomial naive Bayes on word bags (words unseen in training ignored): the predicted label per text.

  log P(c | text) = log prior(c) + sum_w count(w) * log((count(w, c) + alpha) / (count(c) + alpha * |W|)).
  """
  words = sorted({w for text in train_texts for w in _WORD.findall(text.lower())})
  vocabulary = {w: i for i, w in enumerate(words)}
  labels = np.asarray(train_labels)
  train_NxW = _bags(train_texts, vocabulary)
  word_counts_CxW = np.stack([train_NxW[labels == c].sum(0) for c in range(num_classes)]) + alpha
  log_likelihood_CxW = np.log(word_counts_CxW / word_counts_CxW.sum(1, keepdims=True))
  log_prior_C = np.log((np.bincount(labels, minlength=num_classes) + alpha) / (len(labels) + alpha * num_classes))
  return np.argmax(_bags(texts, vocabulary) @ log_likelihood_CxW.T + log_prior_C, axis=1)


def baseline_predictions(
  train: ClassificationRows, evaluated: ClassificationRows, num_classes: int
) -> dict[str, np.ndarray]:
  """{'majority': the training split's most common label everywhere, 'naive_bayes': `naive_bayes`} for the
  examples of `evaluated`."""
  majority = int(np.argmax(np.bincount(train.labels, minlength=num_classes)))
  return {
    "majority": np.full(len(evaluated), majority),
    "naive_bayes": naive_bayes(train.texts, train.labels, evaluated.texts, num_classes),
  }


sources.register(
  sources.Source(
    name="stdlib_packages",
    rows=stdlib_rows,
    labels=PACKAGES,
    families=("encoder_classifier", "decoder_classifier"),
    description="functions labelled by their standard-library package",
  )
)
