"""Instruction and chat data (`data.source='jsonl'`): the loss on the answer only, whole examples packed per row.

`data.paths` (comma-separated files or globs) holds JSON Lines, one record a line, either
    {"prompt": "...", "completion": "..."}
or
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}.
Other keys are ignored. A chat record is rendered with the run's chat template
(`jaxlm.data.chat_template`: the Hugging Face tokenizer's, else the default one).
A bad record stops the run with one line naming the file, the line and the field.

Validation records come from `data.validation_paths` when set, else a stable
`data.val_fraction` of the lines (by a hash of the line's text, so a repeated
line never lands in both splits).

Each record becomes one example: the decoder's prompt prefix (the EOS that
starts every text, as `jaxlm generate` and `jaxlm serve` feed it), the
prompt's tokens, the answer's tokens and a closing EOS. Loss weights are 1 on
the answer (the completion, or every assistant turn with its end-of-turn
marker) and on that EOS, and 0 on everything the model is given. Prompt and
answer are tokenized separately, as at generation time, where the answer's
tokens are produced one by one after the encoded prompt.

Packing puts whole examples into rows of `data.seq_len` (first fit, in file
order), so an answer always sees its prompt: each example is one segment
(ids 1, 2, ... within the row, positions restarting at 0), the rest of a row
is padding with segment id 0 and weight 0. An example longer than a row is
cut at the row's end (a warning counts them). A split where the cut leaves no
answer token at all (every prompt fills the row) is refused: it would train at
loss 0; one where most examples lose every answer token gets a loud warning
with the count. Rows are fixed once built, and
`jaxlm.data.pipeline.train_batches` shuffles them by (seed, epoch), so batch k is a
function of (seed, k) and resuming is exact.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np

from jaxlm import families
from jaxlm.config import ConfigError
from jaxlm.data import chat_template as chat_template_lib
from jaxlm.data import corpus

Batch = dict[str, np.ndarray]  # as jaxlm.data.pipeline's rows (not imported: data.py dispatches to this module)


class RecordError(ConfigError):
  """A record that cannot be used: '<file>, line N: field ...: fix'."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One JSON line: where it came from (`where` = 'file, line N') and its parsed object."""

  where: str
  value: dict


@dataclasses.dataclass
class Example:
  """One record as tokens (1-D int32) and a same-length mask: True where the token is answer (trained on)."""

  tokens: np.ndarray
  answer_mask: np.ndarray


def read_records(data_config, split: str) -> list[Record]:
  """The split's records ('train' or 'validation') from `data_config.paths` / `validation_paths`, in file order."""
  separate = bool(data_config.validation_paths)
  patterns = data_config.validation_paths if separate and split == "validation" else data_config.paths
  try:
    files = corpus.glob_files(patterns.split(","))
  except FileNotFoundError as e:
    key = "data.validation_paths" if separate and split == "validation" else "data.paths"
    raise ConfigError(f"{key}: no file matches '{e.args[0]}'; fix the path or glob") from None
  records = []
  for path in files:
    with open(path, encoding="utf-8", errors="strict") as lines:
      try:
        for number, line in enumerate(lines, start=1):
          if not line.strip() or (not separate and corpus.split_of(line, data_config.val_fraction) != split):
            continue
          where = f"{path}, line {number}"
          try:
            value = json.loads(line)
          except json.JSONDecodeError as e:
            raise RecordError(
              f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line"
            ) from None
          if not isinstance(value, dict):
            raise RecordError(f"{where}: a record must be a JSON object with 'prompt' and 'completion' or 'messages'")
          records.append(Record(where, value))
      except UnicodeDecodeError as e:
        raise RecordError(f"{path}: byte {e.start} of a line is not UTF-8; save the file as UTF-8") from None
  return records


def _text_field(record: Record, key: str, allow_empty: bool) -> str:
  value = record.value.get(key)
  if not isinstance(value, str) or (not value and not allow_empty):
    raise RecordError(
      f"{record.where}: field '{key}' must be a{' ' if allow_empty else ' non-empty '}string, "
      f"got {json.dumps(value)[:40]}"
    )
  return value


def pieces(record: Record, template: chat_template_lib.ChatTemplate) -> list[tuple[str, bool]]:
  """The record's text as (text, is_answer) pieces, in order; RecordError names the bad field."""
  value = record.value
  if "messages" in value and ("prompt" in value or "completion" in value):
    raise RecordError(
      f"{record.where}: field 'messages' and 'prompt'/'completion' together; a record is one or the other"
    )
  if "messages" in value:
    try:
      messages = chat_template_lib.check_messages(value["messages"], record.where)
      if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{record.where}: field 'messages' has no assistant message; there is nothing to learn")
      return template.segments(messages)
    except ValueError as e:  # check_messages names the record; template errors do not
      message = str(e)
      raise RecordError(message if message.startswith(record.where) else f"{record.where}: {message}") from None
  if "prompt" not in value and "completion" not in value:
    raise RecordError(
      f"{record.where}: field 'prompt' and 'completion' (or 'messages') missing; found "
      f"{', '.join(sorted(value)) or 'no fields'}"
    )
  return [
    (_text_field(record, "prompt", allow_empty=True), False),
    (_text_field(record, "completion", allow_empty=False), True),
  ]


def tokenize(record: Record, tokenizer, template, prefix: list[int]) -> Example:
  """`prefix` + the record's pieces, each encoded on its own, + EOS (an answer token when the record ends with
  the answer)."""
  return join(
    [(tokenizer.encode(text), is_answer) for text, is_answer in pieces(record, template)], prefix, tokenizer.eos_id
  )


def join(encoded: list[tuple[np.ndarray, bool]], prefix: list[int], eos_id: int) -> Example:
  """One example from already encoded (ids, is_answer) pieces: `prefix`, the pieces in order, then `eos_id`,
  which is an answer token when the last piece is. Other prompt/completion sources (`jaxlm.tasks.seq2seq`'s
  code summaries) build their examples here, so every one is laid out as a JSON record would be."""
  ids = [np.asarray(prefix, np.int32)] + [np.asarray(i, np.int32) for i, _ in encoded]
  masks = [np.zeros(len(prefix), bool)] + [np.full(len(i), is_answer) for i, is_answer in encoded]
  ids.append(np.asarray([eos_id], np.int32))
  masks.append(np.asarray([encoded[-1][1]]))
  return Example(np.concatenate(ids).astype(np.int32), np.concatenate(masks))


class PackedExamples:
  """Random-access rows {inputs, targets, segment_ids, positions, weights} (each seq_len) of whole examples."""

  def __init__(self, examples: list[Example], seq_len: int):
    self.examples, self.seq_len = examples, seq_len
    self.rows: list[list[int]] = []  # example indices per row
    self.truncated = 0
    self.answerless = 0  # examples whose cut left no answer token
    used = seq_len  # slots used in the current row; starts "full" so the first example opens a row
    for index, example in enumerate(examples):
      slots = min(len(example.tokens) - 1, seq_len)  # an example of L tokens makes L - 1 (input, target) pairs
      self.truncated += len(example.tokens) - 1 > seq_len
      self.answerless += not example.answer_mask[1 : slots + 1].any()
      if used + slots > seq_len:
        self.rows.append([])
        used = 0
      self.rows[-1].append(index)
      used += slots

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> Batch:
    row = self.padding_row()
    start = 0
    for segment, example_index in enumerate(self.rows[int(index)], start=1):
      example = self.examples[example_index]
      n = min(len(example.tokens) - 1, self.seq_len)
      span = slice(start, start + n)
      row["inputs"][span] = example.tokens[:n]
      row["targets"][span] = example.tokens[1 : n + 1]
      row["segment_ids"][span] = segment
      row["positions"][span] = np.arange(n)
      row["weights"][span] = example.answer_mask[1 : n + 1]
      start += n
    return row

  def padding_row(self) -> Batch:
    """A row of zeros (segment 0, weight 0), which fills the last evaluation batch."""
    row = {key: np.zeros(self.seq_len, np.int32) for key in ("inputs", "targets", "segment_ids", "positions")}
    return {**row, "weights": np.zeros(self.seq_len, np.float32)}

  def answer_tokens(self) -> int:
    """Targets with weight 1 across all rows (truncation included)."""
    return int(sum(self[i]["weights"].sum() for i in range(len(self))))


def prompt_prefix(config, tokenizer) -> list[int]:
  """The ids the decoder's adapter puts before every prompt (whole `config`), so training matches decoding."""
  adapter = families.get(config.model.family).adapter(config.model, tokenizer.bos_id)
  return adapter.prompt_ids(tokenizer, "")


def rows(config, tokenizer, split: str) -> PackedExamples:
  """The split's packed rows for the whole `config` (data.paths, data.seq_len) and `tokenizer`."""
  template = chat_template_lib.for_tokenizer(tokenizer)
  prefix = prompt_prefix(config, tokenizer)
  records = read_records(config.data, split)
  examples = [tokenize(record, tokenizer, template, prefix) for record in records]
  packed = PackedExamples(examples, config.data.seq_len)
  seq_len = config.data.seq_len
  if packed.answerless:
    # A row's target j is token j + 1, so an answer whose first token is token p needs data.seq_len >= p.
    needed = sorted(int(np.argmax(example.answer_mask)) for example in examples if example.answer_mask.any())
    files = sorted({record.where.rsplit(", line ", 1)[0] for record in records})
    where = files[0] + (f" and {len(files) - 1} more file(s)" if len(files) > 1 else "")
    counts = f"{packed.answerless} of {len(examples)} {split} examples in {where} keep no answer token"
    fix = (
      f"raise data.seq_len to at least {needed[0]} for any answer token to count ({needed[-1]} for every "
      "example's), or shorten the prompts"
    )
    if packed.answerless == len(examples):
      raise RecordError(
        f"{counts} within data.seq_len={seq_len}: their prompts fill the row, so nothing would be trained "
        f"(loss 0); {fix}"
      )
    if 2 * packed.answerless > len(examples):
      warnings.warn(f"jaxlm: WARNING: {counts} within data.seq_len={seq_len} and teach nothing; {fix}", stacklevel=2)
  if packed.truncated:
    warnings.warn(
      f"data.source='jsonl': {packed.truncated} of {len(examples)} {split} examples are longer than "
      f"data.seq_len={seq_len} tokens and were cut; raise data.seq_len to keep them whole",
      stacklevel=2,
    )
  return packed


def answer_texts(data_config, split: str) -> list[bytes]:
  """The answers of the split's records (completions, assistant turns) as UTF-8: the text the loss is on, which
  the decoder's evaluation compresses with gzip and xz for its baselines."""
  texts = []
  for record in read_records(data_config, split):
    if "messages" in record.value:
      texts += [
        m.get("content", "") for m in record.value["messages"] if isinstance(m, dict) and m.get("role") == "assistant"
      ]
    else:
      texts.append(record.value.get("completion", ""))
  return [text.encode("utf-8") for text in texts if isinstance(text, str)]
