"""SQuAD-style extractive question answering data: examples, windowed features and span decoding.

Examples come from SQuAD-format JSON (`data.paths` for train, `data.validation_paths` for validation) or, with
no paths, from the TFDS `squad` source through `tfds.data_source` (array_record, no TensorFlow; `data.tfds_name`
defaults to 'squad', splits `data.tfds_train_split` / `data.tfds_eval_split`). TFDS gives text as bytes from
prepared data and as str under `tfds.testing.mock_data`; both are read.

Features follow BERT's run_squad (Devlin et al., 2019): the context is split on whitespace, each word
tokenized on its own and joined by the tokens of one space (so a token maps back to a word, or to no word,
and a word to characters), and a row is
`BOS question EOS context-window EOS`, token type 0 on the question part and 1 on the context. A context longer
than fits is cut into windows that start every `data.doc_stride` tokens, so every answer lies whole in some
window. The targets are the answer's first and last token in the row, or (0, 0), the BOS position, when the
window does not hold the whole answer. At evaluation the best span (start <= end, at most
`MAX_ANSWER_TOKENS` long, inside the context) over all windows of an example is its prediction, and every
example whose windows were all scored counts (an example with no scorable span predicts '').

Every answer is checked against its context when read: the context's text at `answer_start` must be the answer's
text, else one line names the file and the question's id. BERT's run_squad.py drops such questions with a warning
and Hugging Face's run_qa.py trains on whatever span the offset gives; guessing the intended occurrence near the
offset could pick the wrong one, so a bad offset is the data's to fix. A question without answers (SQuAD 2.0's
unanswerable ones) is refused the same way: the span head here has no no-answer prediction, so such questions
would be scored wrong, silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data import corpus, packing, sources

MAX_ANSWER_TOKENS = 64  # byte-level tokens: a few words
MAX_QUESTION_SHARE = 4  # a question keeps at most seq_len // 4 tokens


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: its context, the gold answer texts and their character starts in the context."""

  question: str
  context: str
  answers: tuple[str, ...]
  answer_starts: tuple[int, ...]
  id: str = ""  # the data's id of the question, which errors name


def checked(example: Example, where: str) -> Example:
  """Checks that a question has an answer and that each answer's text is at its `answer_start` in the context.

  Args:
    example: the question as read.
    where: the file or data set it comes from, for the error.

  Returns:
    `example`.

  Raises:
    ConfigError: one line naming `where` and the question's id, and the fix.
  """
  question = f"{where}: question '{example.id}'" if example.id else f"{where}: question {example.question[:60]!r}"
  if not example.answers:
    raise ConfigError(
      f"{question} has no answers (SQuAD 2.0's unanswerable questions are not supported: encoder_qa always "
      "predicts a span); drop it, or give its answer"
    )
  for text, start in zip(example.answers, example.answer_starts):
    if not 0 <= start <= len(example.context) - len(text) or example.context[start : start + len(text)] != text:
      found = example.context.find(text)
      hint = f"the text occurs at {found}" if found >= 0 else "the text is nowhere in the context"
      raise ConfigError(
        f"{question}: answer {text[:60]!r} is not at answer_start={start} of its {len(example.context)}-character "
        f"context ({hint}); fix answer_start"
      )
  return example


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_json(path: str | Path) -> list[Example]:
  """The questions of a SQuAD-format JSON file ({'data': [{'paragraphs': [{'context', 'qas': [...]}]}]});
  ConfigError naming the file and the missing field if it is not one."""
  try:
    articles = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    examples = [
      Example(
        qa["question"],
        paragraph["context"],
        tuple(a["text"] for a in qa["answers"]),
        tuple(int(a["answer_start"]) for a in qa["answers"]),
        str(qa.get("id", "")),
      )
      for article in articles
      for paragraph in article["paragraphs"]
      for qa in paragraph["qas"]
    ]
  except (OSError, ValueError) as error:
    raise ConfigError(f"{path}: cannot read SQuAD JSON ({error})") from None
  except (KeyError, TypeError) as error:
    raise ConfigError(
      f"{path}: not SQuAD format (missing field {error}); expected "
      "{'data': [{'paragraphs': [{'context', 'qas': [{'question', 'answers'}]}]}]}"
    ) from None
  return [checked(example, str(path)) for example in examples]


def read_tfds(name: str, split: str, data_dir: str = "") -> list[Example]:
  """The questions of a TFDS SQuAD split through `tfds.data_source`; `split` must be given."""
  import tensorflow_datasets as tfds  # heavy; only this source needs it

  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  examples = []
  for i in range(len(source)):
    record = source[i]
    answers = record["answers"]
    examples.append(
      Example(
        _text(record["question"]),
        _text(record["context"]),
        tuple(_text(t) for t in answers["text"]),
        tuple(int(s) for s in answers["answer_start"]),
        _text(record.get("id", i)),
      )
    )
  return [checked(example, f"TFDS {name} split {split}") for example in examples]


def load_examples(config, split: str) -> list[Example]:
  """The split's examples per the whole `config` (data.paths / data.validation_paths, else TFDS), at most
  data.max_examples of them (0: all)."""
  d = config.data
  paths = d.paths if split == "train" else d.validation_paths
  if paths:
    files = corpus.glob_files([p for p in paths.split(",") if p])
    if not files:
      raise ConfigError(f"data.{'paths' if split == 'train' else 'validation_paths'}='{paths}' matches no file")
    examples = [e for path in files for e in read_json(path)]
  else:
    tfds_split = d.tfds_train_split if split == "train" else d.tfds_eval_split
    examples = read_tfds(d.tfds_name or "squad", tfds_split, d.tfds_data_dir)
  return examples[: d.max_examples] if d.max_examples else examples


def _words(context: str) -> tuple[list[str], list[int]]:
  """Whitespace-separated words and each one's first character index."""
  words, starts, previous_space = [], [], True
  for i, ch in enumerate(context):
    if ch.isspace():
      previous_space = True
    elif previous_space:
      words.append(ch)
      starts.append(i)
      previous_space = False
    else:
      words[-1] += ch
  return words, starts


@dataclasses.dataclass(frozen=True)
class Feature:
  """One window of one example: the row's token ids and types, which context word each row position is
  (-1 outside the context), and the target (start, end) positions."""

  example: int
  ids: tuple[int, ...]
  token_types: tuple[int, ...]
  word_of: tuple[int, ...]
  start: int
  end: int


def features(examples: Sequence[Example], tokenizer, seq_len: int, doc_stride: int) -> list[Feature]:
  """Every example's windows, in order (see the module doc)."""
  result = []
  for index, example in enumerate(examples):
    question = [int(t) for t in tokenizer.encode(example.question)][: seq_len // MAX_QUESTION_SHARE]
    words, word_starts = _words(example.context)
    space = [int(t) for t in tokenizer.encode(" ")]
    context_ids, word_of = [], []
    for w, word in enumerate(words):
      ids = [int(t) for t in tokenizer.encode(word)]
      if w:  # the separating space belongs to no word, so a span never starts or ends on it
        context_ids.extend(space)
        word_of.extend([-1] * len(space))
      context_ids.extend(ids)
      word_of.extend([w] * len(ids))
    answer_tokens = None  # the first and last context token of the first gold answer's words
    if example.answers:
      first_char, last_char = example.answer_starts[0], example.answer_starts[0] + len(example.answers[0]) - 1
      covering = [w for w, s in enumerate(word_starts) if s <= last_char and s + len(words[w]) > first_char]
      if covering:
        answer_tokens = (word_of.index(covering[0]), len(word_of) - 1 - word_of[::-1].index(covering[-1]))
    prefix = [tokenizer.bos_id, *question, tokenizer.eos_id]
    room = seq_len - len(prefix) - 1
    offset = 0
    while True:
      window = range(offset, min(offset + room, len(context_ids)))
      start = end = 0
      if answer_tokens is not None and window.start <= answer_tokens[0] and answer_tokens[1] < window.stop:
        start, end = len(prefix) + answer_tokens[0] - offset, len(prefix) + answer_tokens[1] - offset
      ids = prefix + [context_ids[i] for i in window] + [tokenizer.eos_id]
      result.append(
        Feature(
          index,
          tuple(ids),
          tuple([0] * len(prefix) + [1] * (len(window) + 1)),
          tuple([-1] * len(prefix) + [word_of[i] for i in window] + [-1]),
          start,
          end,
        )
      )
      if window.stop >= len(context_ids):
        break
      offset += doc_stride
  return result


class SquadRows:
  """Random-access rows of SQuAD features: inputs, segment_ids, positions, token_types (seq_len) and
  targets = (start, end), weights = (1, 1) (length 2, matching the span head's B x 2 x T logits)."""

  def __init__(self, examples: Sequence[Example], tokenizer, seq_len: int, doc_stride: int):
    self.examples, self.seq_len = list(examples), seq_len
    self.features = features(self.examples, tokenizer, seq_len, doc_stride)

  def __len__(self) -> int:
    return len(self.features)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    feature, row = self.features[index], self.padding_row()
    n = len(feature.ids)
    row["inputs"][:n], row["token_types"][:n] = feature.ids, feature.token_types
    row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
    row["targets"][:], row["weights"][:] = (feature.start, feature.end), 1.0
    return row

  def padding_row(self) -> dict[str, np.ndarray]:
    """A row of weight 0, to fill the last evaluation batch."""
    return packing.head_padding_row(
      self.seq_len, num_targets=2, token_keys=("inputs", "segment_ids", "positions", "token_types")
    )


def rows(config, tokenizer, split: str) -> SquadRows:
  """The split's rows per the whole `config` (data.seq_len, data.doc_stride and the sources above)."""
  return SquadRows(load_examples(config, split), tokenizer, config.data.seq_len, config.data.doc_stride)


def predictions_json(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, str]:
  """{question id: predicted answer text}, the predictions file SQuAD's official evaluate-v1.1.py reads.

  Args:
    examples: the scored examples, in order (a question without an id is keyed by its index).
    predictions: their predicted answers (`best_spans`), as many as were scored.

  Returns:
    The mapping, in the examples' order.
  """
  return {example.id or str(index): text for index, (example, text) in enumerate(zip(examples, predictions))}


def best_spans(rows: SquadRows, logits_Nx2xT: np.ndarray) -> list[str]:
  """The predicted answer text of each example whose features are all among the first N rows: the context words
  from the best span's first word to its last, cut from the context as written; '' when none of its windows has a
  span to score."""
  best: dict[int, tuple[float, int, int]] = {}
  for feature, logits_2xT in zip(rows.features, logits_Nx2xT):
    word_of = np.full(rows.seq_len, -1)
    word_of[: len(feature.word_of)] = feature.word_of
    in_context = word_of >= 0
    start_T = np.where(in_context, logits_2xT[0], -np.inf)
    end_T = np.where(in_context, logits_2xT[1], -np.inf)
    score_TxT = start_T[:, None] + end_T[None, :]
    offsets = np.arange(rows.seq_len)
    allowed = (offsets[None, :] >= offsets[:, None]) & (offsets[None, :] - offsets[:, None] < MAX_ANSWER_TOKENS)
    score_TxT = np.where(allowed, score_TxT, -np.inf)
    s, e = np.unravel_index(np.argmax(score_TxT), score_TxT.shape)
    if np.isfinite(score_TxT[s, e]) and score_TxT[s, e] > best.get(feature.example, (-np.inf,))[0]:
      best[feature.example] = (float(score_TxT[s, e]), int(word_of[s]), int(word_of[e]))
  scored = len(logits_Nx2xT)
  whole = rows.features[scored].example if scored < len(rows.features) else len(rows.examples)
  predictions = []
  for index in range(whole):
    example = rows.examples[index]
    if index not in best:
      predictions.append("")
      continue
    words, starts = _words(example.context)
    _, first, last = best[index]
    predictions.append(example.context[starts[first] : starts[last] + len(words[last])])
  return predictions


sources.register(
  sources.Source(
    name="squad", rows=rows, families=("encoder_qa",), description="questions on contexts, answered by spans"
  )
)
