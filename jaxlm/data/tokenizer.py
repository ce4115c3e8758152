"""Tokenizers behind one small interface.

A tokenizer maps text to int32 ids and back, knows its special ids, and
reports how many UTF-8 bytes each id stands for, which is what turns a loss
into bits per byte for any vocabulary. It is saved into the run's work
directory, so evaluation and generation need only `--workdir`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxlm.storage import fs


class Tokenizer(Protocol):
  """What every tokenizer provides: vocabulary size, special ids, encode (str/bytes -> ids), decode, save."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  mask_id: int

  def encode(self, text: str | bytes) -> np.ndarray: ...
  def decode(self, ids) -> str: ...
  def byte_lengths(self) -> np.ndarray: ...
  def save(self, directory: Path) -> None: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past four special ids: pad 0, bos 1, eos 2, mask 3."""

  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
  offset = 4
  vocab_size = 256 + offset
  _warned_out_of_range = False  # class-wide: one warning per process

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32) + self.offset

  def decode(self, ids) -> str:
    """Text for `ids`; special ids are dropped, and ids past the byte range (a converted model with a larger
    vocabulary) are skipped with a warning the first time, instead of wrapping into wrong bytes."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    beyond = ids >= self.vocab_size
    if beyond.any() and not self._warned_out_of_range:
      ByteTokenizer._warned_out_of_range = True
      warnings.warn(
        f"ByteTokenizer.decode: skipping ids above {self.vocab_size - 1} (e.g. {int(ids[beyond][0])}), "
        "which stand for no byte; the model's vocabulary is larger than the byte tokenizer's",
        stacklevel=2,
      )
    kept = ids[(ids >= self.offset) & ~beyond]
    return bytes((kept - self.offset).astype(np.uint8)).decode("utf-8", errors="replace")

  def byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.int32)
    lengths[: self.offset] = 0
    return lengths

  def save(self, directory: Path) -> None:
    (fs.path(directory) / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))

  def write_hf_files(self, directory: Path) -> None:
    """Writes this tokenizer as Hugging Face tokenizer files into `directory` (`jaxlm convert --to-hf`)."""
    from jaxlm.data import hf_tokenizer  # local: only the export needs the `tokenizers` library

    hf_tokenizer.write_byte_level(directory, self)


class SentencePieceTokenizer:
  """A SentencePiece model; ids as the model defines them (pad, bos, eos, unk), [MASK] last."""

  def __init__(self, model_path: str | Path):
    import sentencepiece as spm  # local: only runs that use SentencePiece need it

    self.model_path = fs.path(model_path)  # local or gs://: the model is read as bytes
    self.processor = spm.SentencePieceProcessor(model_proto=self.model_path.read_bytes())
    self.pad_id = max(self.processor.pad_id(), 0)
    self.bos_id = self.processor.bos_id()
    self.eos_id = self.processor.eos_id()
    # MLM needs a mask id that never occurs in text: one past the model's pieces.
    self.mask_id = self.processor.get_piece_size()
    self.vocab_size = self.mask_id + 1

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return np.asarray(self.processor.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.mask_id]
    return self.processor.decode(ids)

  def byte_lengths(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.mask_id):
      if not (self.processor.is_control(i) or self.processor.is_unknown(i)):
        lengths[i] = len(self.processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths

  def save(self, directory: Path) -> None:
    (fs.path(directory) / "tokenizer.model").write_bytes(self.model_path.read_bytes())
    (fs.path(directory) / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece", "file": "tokenizer.model"}))


def from_config(data_config) -> Tokenizer:
  """A new tokenizer for the data sub-config (`data.tokenizer`: byte, sentencepiece or huggingface)."""
  if data_config.tokenizer == "byte":
    return ByteTokenizer()
  if data_config.tokenizer == "huggingface":  # a folder with tokenizer.json (jaxlm/data/hf_tokenizer.py)
    from jaxlm.data import hf_tokenizer  # local: only these runs need the `tokenizers` library

    return hf_tokenizer.HuggingFaceTokenizer(data_config.tokenizer_path)
  return SentencePieceTokenizer(data_config.tokenizer_path)


def load(directory: Path) -> Tokenizer:
  """The tokenizer a run saved in `directory`."""
  meta_path = fs.path(directory) / "tokenizer.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{meta_path} is missing; this work directory was not written by `jaxlm train`")
  meta = json.loads(meta_path.read_text())
  if meta["kind"] == "byte":
    return ByteTokenizer()
  if meta["kind"] == "huggingface":
    from jaxlm.data import hf_tokenizer  # local: only these runs need the `tokenizers` library

    return hf_tokenizer.HuggingFaceTokenizer(fs.path(directory) / meta["folder"])
  return SentencePieceTokenizer(fs.path(directory) / meta["file"])
