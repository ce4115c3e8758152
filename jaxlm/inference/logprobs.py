"""Log-probabilities for `jaxlm serve`: OpenAI's `logprobs` object.

The OpenAI completions API (legacy form) returns, per token, its text, its
log-probability, the top-k alternatives and its character offset. The
log-probabilities are the model's own (log-softmax of the logits, before
penalties, bias, temperature, top-k and top-p), computed inside the jitted
prefill and step of `jaxlm.inference.batching`.
"""

from __future__ import annotations

import os

TOP_LOGPROBS = 5  # the most alternatives the completions `logprobs` may ask for, as in the OpenAI API


def token_text(tokenizer, token: int) -> str:
  """A token as text for `logprobs`: special ids by name, a lone non-ASCII byte as OpenAI's 'bytes:\\xNN'."""
  specials = {
    tokenizer.pad_id: "<pad>",
    tokenizer.bos_id: "<bos>",
    tokenizer.eos_id: "<eos>",
    tokenizer.mask_id: "<mask>",
  }
  if token in specials:
    return specials[token]
  text = tokenizer.decode([token])
  offset = getattr(tokenizer, "offset", None)  # the byte tokenizer: one id per byte
  if "\ufffd" in text and offset is not None:
    return f"bytes:\\x{token - offset:02x}"
  return text


def char_offsets(tokenizer, ids: list[int], start: int, stop: int) -> list[int]:
  """Character offset in decode(ids) where each of ids[start:stop] begins.

  A token inside a character split across tokens gets the character's start: the text before token i is
  the part of decode(ids[:i]) that decode(ids) keeps, so an unfinished character, decoded as U+FFFD at the
  end of the shorter text, does not count, while an invalid byte (U+FFFD in both) does."""
  text = tokenizer.decode(ids)
  return [len(os.path.commonprefix([tokenizer.decode(ids[:i]), text])) for i in range(start, stop)]


def logprobs_object(tokenizer, ids: list[int], scores: list[tuple], offsets: list[int], top: int) -> dict:
  """OpenAI's logprobs object for tokens `ids`: `scores` holds (logprob, top ids, top logprobs) per token
  (None where a token has no score) and `offsets` their character offsets; `top` alternatives each."""
  tops = [
    None
    if top_ids is None
    else {token_text(tokenizer, int(i)): float(lp) for i, lp in zip(top_ids[:top], top_logprobs[:top])}
    for _, top_ids, top_logprobs in scores
  ]
  return {
    "tokens": [token_text(tokenizer, i) for i in ids],
    "token_logprobs": [None if lp is None else float(lp) for lp, _, _ in scores],
    "top_logprobs": tops,
    "text_offset": offsets,
  }


def merge_logprobs(parts: list) -> dict | None:
  """One logprobs object from a choice's chunks (None when the request asked for none)."""
  parts = [p for p in parts if p is not None]
  if not parts:
    return None
  return {key: [x for p in parts for x in p[key]] for key in parts[0]}
