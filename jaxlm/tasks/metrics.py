"""Task metrics: SQuAD v1.1 exact match and F1, and classification accuracy with macro precision, recall, F1.

The SQuAD functions follow the official v1.1 evaluation script (Rajpurkar et al., 2016): both strings are
normalized (lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed), exact match
compares the normalized strings, F1 the bags of their whitespace tokens, and a prediction scores the best
over its gold answers. Pure Python and numpy: no JAX.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD v1.1's normalization: lower case, no punctuation, no articles, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 when the normalized strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
  """F1 of the normalized whitespace tokens, counted as a bag (a token repeated counts as often as it is
  common to both); 0.0 when nothing is shared."""
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
  common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
  """{'exact_match', 'f1', 'examples'}: the means over examples (0-1 scale) of the best score over each
  example's gold answers. `golds[i]` lists example i's answers (at least one)."""
  if len(predictions) != len(golds):
    raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
  em = [max(exact_match(p, g) for g in answers) for p, answers in zip(predictions, golds)]
  f1 = [max(token_f1(p, g) for g in answers) for p, answers in zip(predictions, golds)]
  count = max(len(predictions), 1)
  return {"exact_match": sum(em) / count, "f1": sum(f1) / count, "examples": len(predictions)}


def classification_scores(predicted: Sequence[int], gold: Sequence[int], num_classes: int) -> dict:
  """Accuracy and macro precision, recall and F1 over `num_classes` labels, plus per-class rows.

  Returns {'accuracy', 'macro_precision', 'macro_recall', 'macro_f1', 'examples', 'per_class'}, where
  'per_class' is a list of {'precision', 'recall', 'f1', 'support'} by label. A class never predicted has
  precision 0 (as scikit-learn's zero_division=0); the macro means weigh every class the same, so a model
  that only predicts the common class scores low on them even with a high accuracy.
  """
  predicted, gold = np.asarray(predicted, np.int64), np.asarray(gold, np.int64)
  if predicted.shape != gold.shape:
    raise ValueError(f"{predicted.shape} predictions for {gold.shape} labels")
  confusion_GxP = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion_GxP, (gold, predicted), 1)
  hits = np.diag(confusion_GxP).astype(np.float64)
  predicted_counts, supports = confusion_GxP.sum(0), confusion_GxP.sum(1)
  precision = np.divide(hits, predicted_counts, out=np.zeros(num_classes), where=predicted_counts > 0)
  recall = np.divide(hits, supports, out=np.zeros(num_classes), where=supports > 0)
  both = precision + recall
  f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
  per_class = [
    {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
    for p, r, f, s in zip(precision, recall, f1, supports)
  ]
  return {
    "accuracy": float(hits.sum() / max(len(gold), 1)),
    "macro_precision": float(precision.mean()),
    "macro_recall": float(recall.mean()),
    "macro_f1": float(f1.mean()),
    "examples": int(len(gold)),
    "per_class": per_class,
  }


def per_class_table(scores: dict, names: Sequence[str]) -> str:
  """A plain-text table of `classification_scores(...)['per_class']`, one row per class name."""
  width = max(len(n) for n in names)
  lines = [f"{'class':<{width}}  precision  recall     f1  support"]
  for name, row in zip(names, scores["per_class"]):
    lines.append(
      f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
    )
  return "\n".join(lines)
