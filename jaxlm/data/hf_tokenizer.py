"""Hugging Face tokenizers (tokenizer.json) behind jaxlm's tokenizer interface, read with the `tokenizers` library.

A folder written by transformers' `save_pretrained` holds `tokenizer.json`
(the fast tokenizer: model, pre-tokenizer, decoder, added tokens),
`tokenizer_config.json` (special tokens, the chat template in older saves)
and, depending on the transformers version, `special_tokens_map.json` and
`chat_template.jinja`. `HuggingFaceTokenizer` reads all of them without torch
or transformers. A run keeps them in `WORKDIR/hf_tokenizer/` (the run's own
`tokenizer.json` is jaxlm's record of which tokenizer it uses), and
`write_hf_files` copies them back out for `jaxlm convert --to-hf`.

Ids are the tokenizer's own: text is encoded without the post-processor's
special tokens (jaxlm's data and decoding add BOS/EOS themselves), while added
special tokens written in the text (`<|im_end|>` in a rendered chat) become
their ids, as in transformers. Decoding drops special tokens, as
`decode(ids, skip_special_tokens=True)` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.storage import fs

FOLDER = "hf_tokenizer"  # inside a run's work directory
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# jaxlm's byte tokenizer's special ids 0-3 (pad, bos, eos, mask) as Hugging Face tokens.
BYTE_SPECIAL_TOKENS = {
  "pad_token": "<|pad|>",
  "bos_token": "<|bos|>",
  "eos_token": "<|endoftext|>",
  "mask_token": "<|mask|>",
}


def _byte_characters() -> list[str]:
  """GPT-2's printable character for each byte 0-255 (what the `tokenizers` ByteLevel pre-tokenizer maps to)."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("\xa1"), ord("\xac") + 1),
    *range(ord("\xae"), ord("\xff") + 1),
  ]
  shifted = iter(range(256, 512))
  return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def write_byte_level(directory: str | Path, tokenizer) -> None:
  """jaxlm's byte tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
  that `transformers.AutoTokenizer` loads: byte b is id b + 4 and ids 0-3 are `BYTE_SPECIAL_TOKENS`, so
  Hugging Face encodes and decodes text to and from the ids jaxlm does (no BOS or EOS added).

  Args:
    directory: the folder to write into (local or gs://).
    tokenizer: the `jaxlm.data.tokenizer.ByteTokenizer` (its offset and special ids).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # local: as HuggingFaceTokenizer

  special = dict(
    zip((tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id), BYTE_SPECIAL_TOKENS.values())
  )
  vocab = {text: i for i, text in special.items()}
  vocab.update({character: byte + tokenizer.offset for byte, character in enumerate(_byte_characters())})
  backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(text, special=True) for text in special.values()])
  directory = fs.path(directory)
  fs.makedirs(directory)
  (directory / "tokenizer.json").write_text(backend.to_str())
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **BYTE_SPECIAL_TOKENS}
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  (directory / "special_tokens_map.json").write_text(json.dumps(BYTE_SPECIAL_TOKENS, indent=2))


class HuggingFaceTokenizerError(ConfigError):
  """A tokenizer folder that cannot be used; the message names the file and the fix (a ConfigError, so the
  CLI prints it as one line)."""


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with 'content'."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path) -> dict:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise HuggingFaceTokenizerError(f"{path} is not valid JSON ({e}); write it again with save_pretrained") from None


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
  for spaced, joined in (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
  ):
    text = text.replace(spaced, joined)
  return text


class HuggingFaceTokenizer:
  """The tokenizer of a Hugging Face tokenizer folder (`folder`: local or gs://, holding tokenizer.json).

  Attributes beyond the `jaxlm.data.tokenizer.Tokenizer` interface: `special_tokens` (name -> text, e.g.
  {'eos_token': '</s>'}, what chat templates see), `chat_template` (the Jinja source, or None).
  """

  def __init__(self, folder: str | Path):
    from tokenizers import Tokenizer  # local: only runs with a Hugging Face tokenizer need it

    self.folder = fs.path(folder)
    main = self.folder / "tokenizer.json"
    if not main.is_file():
      raise HuggingFaceTokenizerError(
        f"{main} not found; pass a folder written by a Hugging Face tokenizer's "
        "save_pretrained (fast tokenizers only: slow-only vocab files are not read)"
      )
    try:
      self.backend = Tokenizer.from_str(main.read_text())
    except Exception as e:  # tokenizers raises a bare Exception for an unreadable file
      raise HuggingFaceTokenizerError(f"{main} cannot be read by the `tokenizers` library: {e}") from None
    config_path, map_path = self.folder / "tokenizer_config.json", self.folder / "special_tokens_map.json"
    self.config = _read_json(config_path) if config_path.is_file() else {}
    special_map = _read_json(map_path) if map_path.is_file() else {}
    self.special_tokens = {name: _token_text(special_map.get(name, self.config.get(name))) for name in SPECIAL_NAMES}
    self.special_tokens = {name: text for name, text in self.special_tokens.items() if text is not None}
    self.chat_template = self._read_chat_template()

    self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
    ids = {name: self.backend.token_to_id(text) for name, text in self.special_tokens.items()}
    if ids.get("eos_token") is None:
      raise HuggingFaceTokenizerError(
        f"{config_path}: no eos_token in the tokenizer's vocabulary; jaxlm ends every document with one, so "
        "set eos_token (e.g. to '<|endoftext|>' or '</s>') and save again"
      )
    self.eos_id = ids["eos_token"]
    # GPT-2 style tokenizers have one end-of-text token for all roles; padding never reaches the loss.
    self.bos_id = ids.get("bos_token") if ids.get("bos_token") is not None else self.eos_id
    self.pad_id = ids.get("pad_token") if ids.get("pad_token") is not None else self.eos_id
    # Without a mask token (decoders), MLM has none to use: one past the vocabulary, as for SentencePiece.
    self.mask_id = ids.get("mask_token") if ids.get("mask_token") is not None else self.vocab_size
    self._clean_up = bool(self.config.get("clean_up_tokenization_spaces", False)) and (
      type(self.backend.model).__name__ != "BPE"
    )  # transformers 5 skips the clean-up for BPE models

  def _read_chat_template(self) -> str | None:
    """The chat template: chat_template.jinja (transformers >= 4.47 saves), else tokenizer_config.json's."""
    jinja_path = self.folder / "chat_template.jinja"
    if jinja_path.is_file():
      return jinja_path.read_text()
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}, ...]
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    return template if isinstance(template, str) else None

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32 ids of `text` (no BOS/EOS added; special tokens written in the text become their ids)."""
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    """Text of `ids` without special tokens; ids past the tokenizer (a model's padded vocabulary) are dropped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    text = self.backend.decode(ids, skip_special_tokens=True)
    return _clean_up_tokenization(text) if self._clean_up else text

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens), for bits per byte.

    Byte-level BPE (GPT-2) spells each byte as one character, so a token's length is its byte count;
    '<0xNN>' byte-fallback pieces (LLaMA) are one byte; otherwise the piece's text with SentencePiece's
    '\u2581' as a space and WordPiece's '##' continuation mark removed.
    """
    byte_level = type(self.backend.decoder).__name__ == "ByteLevel"
    special = {token.content for token in self.backend.get_added_tokens_decoder().values() if token.special}
    lengths = np.zeros(self.vocab_size, np.int32)
    for token, i in self.backend.get_vocab(with_added_tokens=True).items():
      if token in special or i >= self.vocab_size:
        continue
      if byte_level:
        lengths[i] = len(token)
      elif _BYTE_FALLBACK.fullmatch(token):
        lengths[i] = 1
      else:
        lengths[i] = len(token.removeprefix("##").replace("\u2581", " ").encode("utf-8"))
    return lengths

  def write_hf_files(self, directory: str | Path) -> None:
    """Copies the tokenizer's files (those present) into `directory`, as transformers reads them."""
    directory = fs.path(directory)
    fs.makedirs(directory)
    for name in FILES:
      if (self.folder / name).is_file():
        (directory / name).write_bytes((self.folder / name).read_bytes())

  def save(self, directory: Path) -> None:
    """Writes the files into `directory/hf_tokenizer/` and jaxlm's record `directory/tokenizer.json`."""
    if fs.absolute(self.folder) != fs.absolute(directory) / FOLDER:  # a run re-saving its own keeps it
      self.write_hf_files(fs.path(directory) / FOLDER)
    (fs.path(directory) / "tokenizer.json").write_text(json.dumps({"kind": "huggingface", "folder": FOLDER}))
