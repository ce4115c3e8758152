"""Scoring text with a decoder run: per-token log-probabilities, loss and hidden states (`Run.score`), and
the (context, continuation) log-likelihoods an evaluation harness asks for (`loglikelihood`).

Every text is read as `jaxlm generate` reads a prompt: after one EOS (training ends every document with
EOS, so a text begins after one), so each of its tokens is scored, the first one included. Texts are
batched, right-padded (padding is its own segment and is never attended) and never cut: a text longer than
`max_len` tokens (default `model.max_len`, the positions the model has) is scored in windows of `max_len`
tokens that advance by `stride` (default half of it), as Hugging Face's perplexity guide does; every
token is scored once, in the window where it has at least `max_len - stride` tokens before it (all of
them, in the first window). Nothing is packed and nothing is dropped, unlike the training rows.

Only a decoder (`model.family='decoder'`) gives a probability to a text alone; other families are
refused in one line: an encoder-decoder scores a target only given a source, an encoder (BERT) predicts
masked tokens, and a classifier or span head gives no token probabilities at all.

This module reads only a loaded run (`jaxlm.loader.Run`): it sits at the loader's stage, so that
`Run.score` can call it (tests/unit/test_imports.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import families
from jaxlm.errors import JaxlmError
from jaxlm.models import quantize

MIN_ROW = 16  # rows are padded to a power of two at least this long, so few shapes compile


class ScoreError(JaxlmError, ValueError):
  """A scoring request the run cannot answer (not a decoder, a bad max_len or stride); one line, with the fix."""


@dataclasses.dataclass
class ScoredText:
  """One text's scores.

  token_ids: the text's token ids (N, int32), each scored.
  logprobs: log P(token_ids[i] | EOS, token_ids[:i]) in nats (N, float32).
  is_greedy: whether each token is the model's most likely one there (N, bool).
  loss: the mean negative log-likelihood, -mean(logprobs), nats per token (nan for an empty text).
  num_tokens: N.
  hidden_states: with `hidden_states=True`, num_layers + 1 arrays N x D (the embedder's output, then every
    block's, as `DecoderLM(return_hidden_states=True)` gives them), row i at token_ids[i]; else None.
  """

  token_ids: np.ndarray
  logprobs: np.ndarray
  is_greedy: np.ndarray
  loss: float
  num_tokens: int
  hidden_states: tuple[np.ndarray, ...] | None = None


def check_decoder(run) -> None:
  """Refuses a run whose family gives no probability to a text alone.

  Args:
    run: a `jaxlm.loader.Run`.

  Raises:
    ScoreError: naming model.family and why.
  """
  family = run.config.model.family
  spec = families.get(family)
  # A next-token model of its input alone: it generates (an adapter), reads no (source, target) pairs and has
  # no task head in place of the language-model head.
  if spec.adapter is None or spec.reads_pairs or spec.head is not None:
    if spec.reads_pairs:
      why = "it scores a target only given a source (its loss is `jaxlm eval`'s)"
    elif spec.head is not None:
      why = f"its '{spec.head}' head gives no next-token probabilities"
    else:
      why = "it does not generate text"
    raise ScoreError(
      f"scoring text needs a decoder run (model.family='decoder'); this run has model.family='{family}': {why}"
    )


def windows(first: int, end: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
  """The windows that cover input positions [first, end) of one sequence.

  Args:
    first: the first position whose output is needed.
    end: one past the last.
    max_len: the most positions one window holds.
    stride: the positions each window after the first adds.

  Returns:
    (start, owned, stop) per window: it feeds positions [start, stop) and keeps the outputs of [owned, stop),
    each of which has at least max_len - stride positions before it in the window (or all of them).
  """
  result, owned, stop = [], first, min(end, max(max_len, first + stride))
  while owned < end:
    result.append((max(0, stop - max_len), owned, stop))
    owned, stop = stop, min(end, stop + stride)
  return result


def _row_length(width: int, max_len: int) -> int:
  return min(max_len, max(MIN_ROW, 1 << (width - 1).bit_length()))


def _forward(model, params, tokens_BxT, segment_ids_BxT, positions_BxT, targets_BxT, hidden: bool):
  """(log P(target), target is the argmax, hidden states or ()) at every position of the batch."""
  inputs = families.model_inputs(
    model, {"inputs": tokens_BxT, "segment_ids": segment_ids_BxT, "positions": positions_BxT}
  )
  outputs = model.apply(
    {"params": quantize.materialize(params)}, **inputs, **({"return_hidden_states": True} if hidden else {})
  )
  logits_BxTxV, states = outputs if hidden else (outputs, ())
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  logprob_BxT = target_logit_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
  greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return logprob_BxT, greedy_BxT, tuple(s.astype(jnp.float32) for s in states)


# id(model) -> (model, its jitted `_forward`): Flax modules holding a ConfigDict cannot be hashed, so not static
# arguments; the module is kept so that its id is not reused.
_JITTED: dict[int, tuple] = {}


def _jitted(model):
  if id(model) not in _JITTED:
    _JITTED[id(model)] = (model, jax.jit(functools.partial(_forward, model), static_argnames=("hidden",)))
  return _JITTED[id(model)][1]


def score_ids(
  run,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  batch_size: int = 8,
  max_len: int | None = None,
  stride: int | None = None,
  hidden_states: bool = False,
) -> list[ScoredText]:
  """Scores token ids: each request's targets given EOS and its context.

  Args:
    run: a decoder `jaxlm.loader.Run`.
    requests: (context ids, target ids) pairs; the context may be empty.
    batch_size: windows run together.
    max_len: the most tokens one window feeds the model; default (and at most) `model.max_len`.
    stride: the tokens each further window of a long sequence scores; default max_len // 2.
    hidden_states: also return the hidden states at the targets.

  Returns:
    One `ScoredText` per request, for its target ids.

  Raises:
    ScoreError: not a decoder run, or max_len, stride or batch_size out of range.
  """
  check_decoder(run)
  limit = run.config.model.max_len
  max_len = limit if max_len is None else max_len
  if not 2 <= max_len <= limit:
    raise ScoreError(f"max_len={max_len}: choose 2 to {limit} (model.max_len, the positions the model has)")
  stride = max_len // 2 if stride is None else stride
  if not 1 <= stride <= max_len:
    raise ScoreError(f"stride={stride}: choose 1 to max_len={max_len} (the tokens each further window scores)")
  if batch_size < 1:
    raise ScoreError(f"batch_size={batch_size}: choose 1 or more")
  eos = run.tokenizer.eos_id
  sequences = [np.asarray([eos, *context, *targets], np.int32) for context, targets in requests]
  firsts = [len(context) for context, _ in requests]  # the input position that predicts the first target
  # Position p predicts token p + 1; with hidden states the last token is also fed, for its state.
  jobs = [
    (n, *window)
    for n, (sequence, first) in enumerate(zip(sequences, firsts))
    for window in windows(first, len(sequence) - (0 if hidden_states else 1), max_len, stride)
  ]
  jobs.sort(key=lambda job: job[3] - job[1], reverse=True)  # similar widths share a batch and its padding
  logprobs = [np.zeros(len(s) - 1, np.float32) for s in sequences]
  greedy = [np.zeros(len(s) - 1, bool) for s in sequences]
  states = [None] * len(sequences)
  forward = _jitted(run.model)  # loaded runs' models are deterministic (dropout off)
  for begin in range(0, len(jobs), batch_size):
    batch = jobs[begin : begin + batch_size]
    width = _row_length(batch[0][3] - batch[0][1], max_len)
    tokens, segments, targets = (np.zeros((batch_size, width), np.int32) for _ in range(3))
    for row, (n, start, _, stop) in enumerate(batch):
      piece = sequences[n][start : stop + 1]  # the inputs and the token after the last, when there is one
      tokens[row, : stop - start], segments[row, : stop - start] = piece[: stop - start], 1
      targets[row, : len(piece) - 1] = piece[1:]
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
    logprob_BxT, greedy_BxT, hidden = jax.device_get(
      forward(run.params, tokens, segments, positions, targets, hidden=hidden_states)
    )
    for row, (n, start, owned, stop) in enumerate(batch):
      predicted = slice(owned - start, min(stop, len(sequences[n]) - 1) - start)
      logprobs[n][owned : owned + predicted.stop - predicted.start] = logprob_BxT[row, predicted]
      greedy[n][owned : owned + predicted.stop - predicted.start] = greedy_BxT[row, predicted]
      if hidden_states:
        if states[n] is None:
          states[n] = [np.zeros((len(sequences[n]), layer.shape[-1]), np.float32) for layer in hidden]
        for layer, layer_BxTxD in zip(states[n], hidden):
          layer[owned:stop] = layer_BxTxD[row, owned - start : stop - start]
  results = []
  for n, (context, targets) in enumerate(requests):
    first = firsts[n]
    token_logprobs = logprobs[n][first:]
    results.append(
      ScoredText(
        token_ids=np.asarray(targets, np.int32),
        logprobs=token_logprobs,
        is_greedy=greedy[n][first:],
        loss=float(-token_logprobs.mean()) if len(token_logprobs) else float("nan"),
        num_tokens=len(token_logprobs),
        hidden_states=None if not hidden_states else _target_states(states[n], first, len(targets)),
      )
    )
  return results


def _target_states(layers, first: int, count: int) -> tuple[np.ndarray, ...]:
  """The rows of the targets (positions first + 1 ...) of each layer; empty arrays for an empty target."""
  if layers is None:
    return ()
  return tuple(layer[first + 1 : first + 1 + count] for layer in layers)


def score(
  run,
  texts: Sequence[str],
  batch_size: int = 8,
  max_len: int | None = None,
  stride: int | None = None,
  hidden_states: bool = False,
) -> list[ScoredText]:
  """Per-token log-probabilities, loss and token count (and hidden states) of each text; see the module doc.

  Args:
    run: a decoder `jaxlm.loader.Run`.
    texts: the strings to score.
    batch_size, max_len, stride, hidden_states: as `score_ids`.

  Returns:
    One `ScoredText` per text.

  Raises:
    ScoreError: not a decoder run, bad max_len, stride or batch_size, or `texts` given as one string.
  """
  if isinstance(texts, (str, bytes)):
    raise ScoreError("texts is one string; pass a list of strings, e.g. run.score([text])")
  requests = [((), [int(i) for i in run.tokenizer.encode(text)]) for text in texts]
  return score_ids(run, requests, batch_size, max_len, stride, hidden_states)


def split_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), as the lm-evaluation-harness splits them: the whole text is encoded
  and the continuation is what follows the context's own encoding; the context's trailing spaces move to the
  continuation first, so a tokenizer that joins a space to the next word sees it there.

  Args:
    tokenizer: the run's tokenizer.
    context, continuation: the two texts.

  Returns:
    The two id lists.
  """
  spaces = len(context) - len(context.rstrip(" "))
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = [int(i) for i in tokenizer.encode(context + continuation)]
  context_ids = [int(i) for i in tokenizer.encode(context)] if context else []
  return whole[: len(context_ids)], whole[len(context_ids) :]


def loglikelihood(
  run,
  requests: Sequence[tuple[str, str]],
  batch_size: int = 8,
  max_len: int | None = None,
) -> list[tuple[float, bool]]:
  """The log-probability of each continuation given EOS and its context, and whether greedy decoding would
  produce it: the answer of an lm-evaluation-harness `loglikelihood` request.

  A context too long for one window keeps its last tokens: the continuation is scored with the most context
  that fits (a continuation longer than `max_len` is scored in windows, as `score` does).

  Args:
    run: a decoder `jaxlm.loader.Run`.
    requests: (context, continuation) text pairs.
    batch_size, max_len: as `score_ids`.

  Returns:
    (sum of the continuation's token log-probabilities in nats, every token greedy) per request.
  """
  pairs = [split_encode(run.tokenizer, context, continuation) for context, continuation in requests]
  scored = score_ids(run, pairs, batch_size, max_len)
  return [(float(s.logprobs.sum()), bool(s.is_greedy.all())) for s in scored]
