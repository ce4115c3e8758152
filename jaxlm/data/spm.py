"""Training a SentencePiece vocabulary from a run's training text, as Flax's wmt example does.

`data.tokenizer='sentencepiece'` with `data.spm_vocab_size=N` trains a
unigram model of N pieces at `data.tokenizer_path` when no file is there yet
and reuses it otherwise. Ids mirror the byte tokenizer: pad 0, bos 1, eos 2,
unk 3 (`tokenizer.SentencePieceTokenizer` adds [MASK] after the pieces). The
model file is then copied into the run's work directory like any tokenizer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import jax

from jaxlm import families
from jaxlm.config import Config, ConfigError
from jaxlm.storage import fs


def train(sentences: Iterable[str], model_path: str | Path, vocab_size: int, max_sentences: int = 1_000_000) -> Path:
  """Trains a unigram SentencePiece model on `sentences` and writes it to `model_path`."""
  import sentencepiece as spm  # local: only runs that use SentencePiece need it

  model_path = fs.path(model_path)
  fs.makedirs(model_path.parent)
  # Locally the temporary folder sits beside the model, for an atomic rename; a bucket's objects appear whole.
  with tempfile.TemporaryDirectory(dir=None if fs.is_url(model_path) else model_path.parent) as tmp:
    prefix = Path(tmp) / f"spm{jax.process_index()}"
    spm.SentencePieceTrainer.train(
      sentence_iterator=_limited(sentences, max_sentences),
      model_prefix=str(prefix),
      vocab_size=vocab_size,
      model_type="unigram",
      character_coverage=1.0,
      pad_id=0,
      bos_id=1,
      eos_id=2,
      unk_id=3,
      # Code and long lines: keep whitespace runs and digits as text, do not drop long sentences.
      split_digits=True,
      max_sentence_length=1 << 16,
      remove_extra_whitespaces=False,
      minloglevel=2,
    )
    if fs.is_url(model_path):
      model_path.write_bytes(Path(f"{prefix}.model").read_bytes())
    else:
      os.replace(f"{prefix}.model", model_path)  # atomic: another process never reads half a file
  return model_path


def _limited(sentences: Iterable[str], limit: int) -> Iterator[str]:
  for i, sentence in enumerate(sentences):
    if i >= limit:
      return
    if sentence.strip():
      yield sentence


def training_sentences(config: Config) -> Iterator[str]:
  """The lines a vocabulary is trained on, per the family of the whole `config` (`Family.training_text`)."""
  return families.get(config.model.family).training_text(config)


def train_if_missing(config: Config) -> None:
  """Trains a vocabulary at `config.data.tokenizer_path` (whole config) unless a file is already there."""
  path = fs.path(config.data.tokenizer_path)
  if path.is_file():
    return
  if not fs.is_url(path) and not path.parent.exists() and not path.parent.parent.exists():
    raise ConfigError(f"data.tokenizer_path '{path}': its folder cannot be created; pass a path in an existing folder")
  train(training_sentences(config), path, config.data.spm_vocab_size)
