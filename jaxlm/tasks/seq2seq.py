"""Sequence-to-sequence data: (source, target) text pairs -> packed rows, and their BLEU evaluation.

Two layouts of the same pairs:
- For `model.EncoderDecoder` (`Seq2SeqRows`), each pair becomes source ids +
  EOS and target ids + EOS, truncated to the row lengths (data.seq_len for the
  source, data.target_len or seq_len for the target). Training rows pack
  consecutive pairs greedily until either side is full; pair k of a row has
  segment id k on both sides, so its target attends to its own source only
  (the model's cross mask) and positions restart at 0. The decoder input of a
  pair is BOS followed by its target shifted right. Evaluation rows hold one
  pair each, which beam search needs.
- For a decoder-only model (`PromptCompletionRows`), each pair is one
  prompt -> completion example laid out as `jaxlm.data.instruct` lays out a
  JSON record: the decoder's prompt prefix, the source, `SEPARATOR`, then the
  target and EOS, with loss weight on the target and EOS only, whole examples
  packed per row. The last data.target_len tokens of a row are the target's:
  the source is cut at its end to fit the rest, so training and generation see
  the same prompt, and the separator always ends it.

`evaluate` scores either family the same way: validation loss, then corpus
BLEU (sacrebleu) of beam-search outputs beside `codesum`'s baselines for code
summarization, or beside copying the source for translation.

Batch keys are documented in `jaxlm.models.transformer`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxlm.config import Config, ConfigError
from jaxlm.data import instruct, sources
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference import decode
from jaxlm.tasks import codesum

Batch = dict[str, np.ndarray]
SEPARATOR = "\n# Summary: "  # ends every decoder prompt: a comment line, which a code model has seen often
MIN_SOURCE_TOKENS = 16  # a decoder prompt with less source than this says little about the function


def load_pairs(config: Config, split: str) -> list[tuple[str, str]]:
  """The split's (source, target) text pairs from the `config.data.source` entry (`Source.pairs`); whole config."""
  source = sources.get(config.data.source)
  if source.pairs is None:
    raise ValueError(
      f"data.source '{config.data.source}' has no (source, target) pairs; use {' or '.join(sources.offering('pairs'))}"
    )
  return source.pairs(config, split)


def pair_lines(config: Config) -> Iterator[str]:
  """Both sides of every training pair (whole config), for a SentencePiece vocabulary."""
  for source, target in load_pairs(config, "train"):
    yield source
    yield target


def _ids(text: str, tokenizer: Tokenizer, max_len: int) -> np.ndarray:
  return np.append(tokenizer.encode(text)[: max_len - 1], np.int32(tokenizer.eos_id)).astype(np.int32)


class Seq2SeqRows:
  """Random-access rows of (source, target) pairs; `pack=False` gives one pair per row."""

  def __init__(
    self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, source_len: int, target_len: int, pack: bool = True
  ):
    self.seq_len, self.target_len, self.bos_id = source_len, target_len, tokenizer.bos_id
    self.references = [target for _, target in pairs]
    self.examples = [(_ids(s, tokenizer, source_len), _ids(t, tokenizer, target_len)) for s, t in pairs]
    self.row_examples = (
      _pack(self.examples, source_len, target_len) if pack else [[i] for i in range(len(self.examples))]
    )

  def __len__(self) -> int:
    return len(self.row_examples)

  def prompt(self, example: int) -> list[int]:
    """Pair `example`'s source ids, which beam search starts from."""
    return [int(i) for i in self.examples[example][0]]

  def __getitem__(self, index: int) -> Batch:
    row = self.padding_row()
    source_at = target_at = 0
    for segment, example in enumerate(self.row_examples[int(index)], start=1):
      source, target = self.examples[example]
      s, t = slice(source_at, source_at + len(source)), slice(target_at, target_at + len(target))
      row["inputs"][s], row["input_segment_ids"][s], row["input_positions"][s] = source, segment, np.arange(len(source))
      row["targets"][t], row["segment_ids"][t], row["positions"][t] = target, segment, np.arange(len(target))
      row["decoder_inputs"][t] = np.concatenate([[self.bos_id], target[:-1]])
      row["weights"][t] = 1.0
      source_at, target_at = s.stop, t.stop
    return row

  def padding_row(self) -> Batch:
    """A row of weight 0 (source and target all padding), to fill the last evaluation batch."""
    source = lambda: np.zeros(self.seq_len, np.int32)
    target = lambda: np.zeros(self.target_len, np.int32)
    return {
      "inputs": source(),
      "input_segment_ids": source(),
      "input_positions": source(),
      "decoder_inputs": target(),
      "targets": target(),
      "segment_ids": target(),
      "positions": target(),
      "weights": np.zeros(self.target_len, np.float32),
    }


def _pack(examples, source_len: int, target_len: int) -> list[list[int]]:
  """Consecutive examples per row, a new row whenever either side would overflow."""
  rows, current, used_source, used_target = [], [], 0, 0
  for i, (source, target) in enumerate(examples):
    if current and (used_source + len(source) > source_len or used_target + len(target) > target_len):
      rows.append(current)
      current, used_source, used_target = [], 0, 0
    current.append(i)
    used_source += len(source)
    used_target += len(target)
  if current:
    rows.append(current)
  return rows


def prepare(config: Config, tokenizer: Tokenizer, split: str, pack: bool | None = None) -> Seq2SeqRows:
  """Rows of a split; training rows are packed, validation rows hold one pair each unless `pack` says."""
  pack = split == "train" if pack is None else pack
  d = config.data
  return Seq2SeqRows(load_pairs(config, split), tokenizer, d.seq_len, d.target_len or d.seq_len, pack)


class PromptCompletionRows(instruct.PackedExamples):
  """A decoder's rows of (source, target) pairs as prompt -> completion, with each pair's prompt and reference.

  `prefix`: the ids the decoder's adapter puts before every prompt (`instruct.prompt_prefix`).
  Raises ConfigError when data.target_len leaves fewer than MIN_SOURCE_TOKENS tokens for the source.
  """

  def __init__(
    self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, prefix: list[int], seq_len: int, target_len: int
  ):
    separator = tokenizer.encode(SEPARATOR)
    source_len = seq_len - target_len - len(prefix) - len(separator)
    if source_len < MIN_SOURCE_TOKENS:
      most = target_len + source_len - MIN_SOURCE_TOKENS
      raise ConfigError(
        f"data.target_len={target_len} leaves {source_len} of data.seq_len={seq_len} tokens for the "
        f"source; lower data.target_len to at most {most}"
      )
    # The target's EOS is its last token, so a cut target still ends; every example is at most seq_len long.
    examples = [
      instruct.join(
        [
          (tokenizer.encode(source)[:source_len], False),
          (separator, False),
          (tokenizer.encode(target)[: target_len - 1], True),
        ],
        prefix,
        tokenizer.eos_id,
      )
      for source, target in pairs
    ]
    super().__init__(examples, seq_len)
    self.references = [target for _, target in pairs]

  def prompt(self, example: int) -> list[int]:
    """Pair `example`'s prompt ids (prefix, source, separator): its tokens before the first answer token."""
    tokens, answer_mask = self.examples[example].tokens, self.examples[example].answer_mask
    return [int(i) for i in tokens[: int(np.argmax(answer_mask))]]


def prompt_completion_rows(config: Config, tokenizer: Tokenizer, split: str) -> PromptCompletionRows:
  """The split's pairs as a decoder's packed prompt -> completion rows (whole config: data.seq_len, target_len)."""
  d = config.data
  prefix = instruct.prompt_prefix(config, tokenizer)
  return PromptCompletionRows(load_pairs(config, split), tokenizer, prefix, d.seq_len, d.target_len)


def generate_texts(config: Config, params, rows, tokenizer, num_examples: int) -> list[str]:
  """Beam-search outputs (jaxlm.inference.decode's cached search) from the first `num_examples` prompts of `rows`
  (`rows.prompt(i)`: token ids), decoded to text."""
  e = config.eval
  max_len = e.max_decode_len or config.data.target_len or config.data.seq_len
  searcher = decode.BeamSearcher(config.model, params, start_id=tokenizer.bos_id)
  texts = []
  for first in range(0, num_examples, e.batch_size):
    prompts = [rows.prompt(i) for i in range(first, min(first + e.batch_size, num_examples))]
    # A full batch every time, so the search compiles once per prompt width; the repeated last prompt is dropped.
    padded = prompts + [prompts[-1]] * (e.batch_size - len(prompts))
    result = searcher.search(padded, e.beam_size, max_len, tokenizer.eos_id, e.length_penalty)
    texts += [tokenizer.decode(ids) for ids in result.tokens[: len(prompts)]]  # tokens stop before EOS
  return texts


def bleu_scores(config: Config, params, rows, tokenizer) -> dict:
  """BLEU of the model's beam-search outputs from `rows` (with `prompt(i)` and `references`, as both row
  classes here have) and of the baselines on the same references, plus five examples."""
  num_examples = min(len(rows.references), config.eval.bleu_examples or len(rows.references))
  references = rows.references[:num_examples]
  predictions = generate_texts(config, params, rows, tokenizer, num_examples)
  scores = {"bleu": codesum.bleu(predictions, references), "bleu_examples": num_examples}
  baselines = sources.get(config.data.source).baselines
  if baselines is not None:
    for name, baseline in baselines(config, num_examples).items():
      scores[f"baseline_{name}_bleu"] = codesum.bleu(baseline, references)
  else:
    source_texts = [source for source, _ in load_pairs(config, "validation")[:num_examples]]
    scores["baseline_copy_source_bleu"] = codesum.bleu(source_texts, references)
  scores["examples"] = [{"reference": r, "prediction": p} for r, p in zip(references[:5], predictions[:5])]
  return scores


def evaluate(evaluation) -> dict:
  """Validation loss and accuracy, BLEU beside trivial baselines, and a one-line summary, for a
  `jaxlm.tasks.evaluate.Evaluation` whose rows are this module's (either family's)."""
  metrics = evaluation.loss_metrics()
  result = {key: metrics[key] for key in ("step", "tokens", "loss", "accuracy")}
  config = evaluation.config
  result.update(bleu_scores(config, evaluation.params, evaluation.rows, evaluation.tokenizer))
  result["summary"] = (
    f"step {result['step']}: validation loss {result['loss']:.4f}, BLEU {result['bleu']:.2f} (sacrebleu, 0-100) "
    f"(beam {config.eval.beam_size}, alpha {config.eval.length_penalty}; baselines: "
    + ", ".join(
      f"{k[len('baseline_') : -len('_bleu')]} {v:.2f}" for k, v in result.items() if k.startswith("baseline_")
    )
    + ")"
  )
  return result


def _codesum_pairs(config: Config, split: str) -> list[tuple[str, str]]:
  d = config.data
  pairs = [(p.source, p.summary) for p in codesum.load_pairs(split, d.val_fraction, d.include_tests)]
  return pairs[: d.max_examples] if d.max_examples else pairs


def _codesum_baselines(config: Config, count: int) -> dict[str, list[str]]:
  d = config.data
  train_pairs = codesum.load_pairs("train", d.val_fraction, d.include_tests)
  eval_pairs = codesum.load_pairs("validation", d.val_fraction, d.include_tests)[:count]
  return codesum.baseline_predictions(train_pairs, eval_pairs)


sources.register(
  sources.Source(
    name="codesum",
    pairs=_codesum_pairs,
    families=("encoder_decoder", "decoder"),
    baselines=_codesum_baselines,
    description="code with summaries",
  )
)
