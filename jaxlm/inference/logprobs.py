"""Log-probabilities for `jaxlm serve`: a generator that keeps them, and OpenAI's `logprobs` object.

The OpenAI completions API (legacy form) returns, per token, its text, its
log-probability, the top-k alternatives and its character offset. Here the
log-probabilities are the model's own (log-softmax of the logits, before
temperature, top-k and top-p), computed inside the jitted prefill and step so
the server still compiles one step for its life.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxlm.inference import decode
from jaxlm.models import quantize

TOP_LOGPROBS = 5  # the most alternatives `logprobs` may ask for, as in the OpenAI API


def _top(logp_xV, k: int):
  values, ids = jax.lax.top_k(logp_xV, k)
  return ids.astype(jnp.int32), values


class ScoringGenerator(decode.Generator):
  """`decode.Generator` that also keeps each step's log-probabilities, for `logprobs` and `echo`.

  After every prefill or step call, `scores` holds (on device) the chosen
  tokens' log-probabilities `logprob_B`, the top TOP_LOGPROBS alternatives
  `top_ids_BxK`/`top_logprobs_BxK` and, after a prefill while
  `score_prompt_now` is set (a batch that echoes a prompt with its
  log-probabilities), the same for every prompt token (`prompt_*`, position j
  scored from j-1). That is a B x P x V softmax, so it is a second compiled
  prefill, used only when asked for. `stream` yields each step's tokens right
  after the call that made them, so `scores` always belongs to the StepOutput
  just received. `can_score_prompt`: the prompt is text the model continues
  (not an encoder's source).
  """

  def __init__(
    self,
    cfg,
    params,
    cache_len: int | None = None,
    start_id: int = 1,
    can_score_prompt: bool = True,
    mesh=None,
    rules=(),
  ):
    super().__init__(cfg, params, cache_len, start_id, mesh, rules)
    self.can_score_prompt, self.score_prompt_now, self.scores = can_score_prompt, False, {}
    prefill = jax.jit(self._scored_prefill, static_argnames=("cache_len", "do_sample", "score_prompt"))
    step = jax.jit(self._scored_step, static_argnames=("do_sample",), donate_argnums=(1,))

    def keep(function):
      def call(*args, **kwargs):
        tokens_B, state, self.scores = function(*args, **kwargs)
        return tokens_B, state

      return call

    self.prefill = keep(
      lambda *args, **kwargs: prefill(*args, **kwargs, score_prompt=self.can_score_prompt and self.score_prompt_now)
    )
    self.step = keep(step)

  def _scored_prefill(self, params, prompt, sampling, cache_len: int, do_sample: bool, score_prompt: bool):
    logits_BxPxV, next_BxV, state = self.adapter.prefill(quantize.materialize(params), prompt, cache_len)
    tokens_B = decode.choose(next_BxV, sampling, 0, do_sample)
    scores = self._score(next_BxV, tokens_B)
    if score_prompt:
      logp_BxPxV = jax.nn.log_softmax(logits_BxPxV[:, :-1].astype(jnp.float32))
      following_BxP = prompt["tokens_BxP"][:, 1:]
      scores["prompt_logprob_BxP"] = jnp.take_along_axis(logp_BxPxV, following_BxP[..., None], axis=-1)[..., 0]
      scores["prompt_top_ids_BxPxK"], scores["prompt_top_logprobs_BxPxK"] = _top(logp_BxPxV, TOP_LOGPROBS)
    return tokens_B, state, scores

  def _scored_step(self, params, state, tokens_B, sampling, t, do_sample: bool):
    logits_BxV, state = self.adapter.step(quantize.materialize(params), state, tokens_B)
    tokens_B = decode.choose(logits_BxV, sampling, t, do_sample)
    return tokens_B, state, self._score(logits_BxV, tokens_B)

  @staticmethod
  def _score(logits_BxV, tokens_B) -> dict:
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32))
    top_ids, top_logprobs = _top(logp_BxV, TOP_LOGPROBS)
    return {
      "logprob_B": jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0],
      "top_ids_BxK": top_ids,
      "top_logprobs_BxK": top_logprobs,
    }


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
