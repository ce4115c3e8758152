"""Continuous batching for `jaxlm serve`: a fixed number of decode slots that requests join between steps.

The decode batch is `slots` rows, each a request's own: its own position, its own cache row and its own
sampling settings. Between two decode steps the engine takes waiting requests into free slots (one prefill
each, batch 1, into the slot's cache row) and frees the slots whose requests finished, so a short request
never waits for a long one (`--batching continuous`). `--batching static` takes requests only when every
slot is free, as the server did before (a batch decodes to its longest request, then the next starts).

The cache is a ring. The model writes each step's keys and values of every row at one shared cache index
(`decode.Adapter.ring_step`), which advances by one slot per step and wraps at the cache length. A request
that joins at index g has its prefilled prompt rolled to end at g, so its tokens are contiguous (mod the cache
length) and the next one lands at g; the cache length is the model's context rounded up, which one request
never outgrows, so it never overwrites its own earlier tokens. The step compiles once for the slot count;
prefill once per prompt-length bucket.

Per row the step also applies OpenAI's `presence_penalty` and `frequency_penalty` (over the tokens the
request generated, as vLLM does) and `logit_bias` (a V-vector kept on the device beside the counts), and keeps
each token's log-probability under the model (before penalties, bias, temperature and filtering) and the
top TOP_LOGPROBS alternatives, for `logprobs`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.inference import decode, openai
from jaxlm.inference import logprobs as scoring
from jaxlm.inference import text as text_lib
from jaxlm.models import quantize

LOG = logging.getLogger("jaxlm.inference.server")
TOP_LOGPROBS = 20  # alternatives kept per token: chat's `top_logprobs` goes up to 20, as in the OpenAI API
POLICIES = ("continuous", "static")


# --- The slot decoder: jitted per-slot prefill and the ring step -------------------------------------


def _scores(logits_BxV, tokens_B) -> dict:
  """The chosen tokens' log-probabilities and the top TOP_LOGPROBS alternatives under the raw logits."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32))
  top_logprobs_BxK, top_ids_BxK = jax.lax.top_k(logp_BxV, TOP_LOGPROBS)
  return {
    "logprob_B": jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0],
    "top_ids_BxK": top_ids_BxK.astype(jnp.int32),
    "top_logprobs_BxK": top_logprobs_BxK,
  }


def _choose(logits_BxV, settings: dict, do_sample: bool):
  """Each row's next token: `decode.sample` keyed by (seed, the row's own step), or argmax."""
  if not do_sample:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  keys_B = jax.vmap(lambda seed, t: jax.random.fold_in(jax.random.key(seed), t))(settings["seeds_B"], settings["t_B"])
  return decode.sample(logits_BxV, keys_B, settings["temperature_B"], settings["top_k_B"], settings["top_p_B"])


class SlotDecoder:
  """`slots` decode rows that requests join one at a time (see the module docstring).

  Args:
    model_cfg: the model sub-config.
    params: its parameters (float, or int8 from `jaxlm.models.quantize`).
    slots: the rows of the decode batch.
    start_id: BOS, an encoder-decoder's first token.
    mesh, rules: as `decode.Generator`: the params' mesh and the config's logical rules (None: one device).

  Attributes:
    cfg: the model sub-config.
    slots: the rows.
    can_score_prompt: the prompt is text the model continues (an encoder's source has no log-probabilities).
  """

  def __init__(self, model_cfg, params, slots: int, start_id: int = 1, mesh=None, rules=()):
    self.cfg, self.params, self.slots, self.mesh, self.rules = model_cfg, params, slots, mesh, rules
    self.adapter = decode.adapter_for(model_cfg, start_id)
    self.can_score_prompt = self.adapter.prompt_in_cache
    self.cache_len = decode.round_up(model_cfg.max_len, decode.PROMPT_BUCKET)
    # An encoder's source is a per-row array of the state: one width for every request.
    self.prompt_width = None if self.adapter.prompt_in_cache else self.cache_len
    self._insert = jax.jit(self._insert_fn, static_argnames=("do_sample", "score_prompt"), donate_argnums=(1,))
    self._step = jax.jit(self._step_fn, static_argnames=("do_sample",), donate_argnums=(1,))
    self.state = self.empty_state()

  def empty_state(self):
    """A state of `slots` idle rows (zeros), on the mesh as the decode functions keep it."""

    def empty():
      prompt = {"tokens_BxP": jnp.zeros((self.slots, self.prompt_width or 1), jnp.int32)}
      prompt["lengths_B"] = jnp.ones((self.slots,), jnp.int32)
      shapes = jax.eval_shape(
        lambda: self.adapter.prefill(quantize.materialize(self.params), prompt, self.cache_len)[2]
      )
      state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      vocab = self.cfg.vocab_size
      return {
        "decode": decode.constrain(state),
        "counts_BxV": jnp.zeros((self.slots, vocab), jnp.int32),
        "bias_BxV": jnp.zeros((self.slots, vocab), jnp.float32),
      }

    with decode.on_mesh(self.mesh, self.rules):
      state = jax.jit(empty)()
    sharding = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
    if self.mesh is None and isinstance(sharding, jax.sharding.NamedSharding):
      # Params on a mesh (the loader's one-device mesh) make the decode functions return their state on it;
      # a state off it would differ in type from theirs and compile `_insert` a second time.
      state = jax.device_put(state, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return state

  def _insert_fn(self, params, state, prompt, row, bias_V, settings, do_sample: bool, score_prompt: bool):
    """Prefills one prompt (batch 1) and puts it in slot `row`, its tokens ending at the ring's index."""
    logits_1xPxV, next_1xV, fresh = self.adapter.prefill(quantize.materialize(params), prompt, self.cache_len)
    token_1 = _choose(next_1xV.astype(jnp.float32) + bias_V[None], settings, do_sample)
    scores = _scores(next_1xV, token_1)
    if score_prompt:  # position j scores token j + 1 (the first token has no context)
      logp_1xPxV = jax.nn.log_softmax(logits_1xPxV[:, :-1].astype(jnp.float32))
      following_1xP = prompt["tokens_BxP"][:, 1:]
      scores["prompt_logprob_BxP"] = jnp.take_along_axis(logp_1xPxV, following_1xP[..., None], axis=-1)[..., 0]
      top_logprobs, top_ids = jax.lax.top_k(logp_1xPxV, TOP_LOGPROBS)
      scores["prompt_top_ids_BxPxK"], scores["prompt_top_logprobs_BxPxK"] = top_ids.astype(jnp.int32), top_logprobs
    ring = state["decode"]
    # The slots the prompt filled ([0, tokens in cache)) move to end just before the ring's next index.
    shift = (ring["slot"] - fresh["rows"]["positions_B"][0]) % self.cache_len

    def put(big, small, axis, roll_axis=None):
      if roll_axis is not None:
        small = jnp.roll(small, shift, axis=roll_axis)
      return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), row, axis)

    def cache_leaf(path, big, small):
      if getattr(path[-1], "key", "") not in ("cached_key", "cached_value"):
        return big  # cache_index: the ring's own, set at each step
      return put(big, small, big.ndim - 4, big.ndim - 3)  # [layers] x B x S x K x H

    rows = {
      name: put(ring["rows"][name], value, 0, 1 if name == "kv_segment_ids_BxS" else None)
      for name, value in fresh["rows"].items()
    }
    cache = jax.tree_util.tree_map_with_path(cache_leaf, ring["cache"], fresh["cache"])
    state = {
      "decode": decode.constrain({"cache": cache, "rows": rows, "slot": ring["slot"]}),
      "counts_BxV": state["counts_BxV"].at[row].set(0),
      "bias_BxV": state["bias_BxV"].at[row].set(bias_V),
    }
    return token_1, scores, state

  def _step_fn(self, params, state, tokens_B, settings, do_sample: bool):
    logits_BxV, ring = self.adapter.ring_step(quantize.materialize(params), state["decode"], tokens_B)
    counts_BxV = state["counts_BxV"]
    adjusted_BxV = (
      logits_BxV.astype(jnp.float32)
      + state["bias_BxV"]
      - settings["presence_B"][:, None] * (counts_BxV > 0)
      - settings["frequency_B"][:, None] * counts_BxV
    )
    next_B = _choose(adjusted_BxV, settings, do_sample)
    counts_BxV = counts_BxV.at[jnp.arange(next_B.shape[0]), next_B].add(1)
    state = {"decode": ring, "counts_BxV": counts_BxV, "bias_BxV": state["bias_BxV"]}
    return next_B, _scores(logits_BxV, next_B), state

  def insert(self, row: int, ids: Sequence[int], sampling: dict, bias: dict, score_prompt: bool):
    """Prefills `ids` into slot `row` and returns its first token and the scores (numpy).

    Args:
      row: the slot.
      ids: the prompt's token ids.
      sampling: {'temperature', 'top_k', 'top_p', 'seed'} of the request.
      bias: {token id: logit bias}.
      score_prompt: also score every prompt token ('prompt_*' scores, for `echo` with `logprobs`).

    Returns:
      (the first token, {'logprob_B', 'top_ids_BxK', 'top_logprobs_BxK', and 'prompt_*' when asked}), batch 1.
    """
    tokens_1xP, lengths_1 = decode.pad_prompts([ids], 1, self.prompt_width)
    bias_V = np.zeros(self.cfg.vocab_size, np.float32)
    bias_V[list(bias)] = list(bias.values())
    settings = {
      "seeds_B": np.asarray([sampling["seed"]], np.uint32),
      "t_B": np.zeros(1, np.int32),
      "temperature_B": np.asarray([sampling["temperature"]], np.float32),
      "top_k_B": np.asarray([sampling["top_k"]], np.int32),
      "top_p_B": np.asarray([sampling["top_p"]], np.float32),
    }
    prompt = {"tokens_BxP": tokens_1xP, "lengths_B": lengths_1}
    with decode.on_mesh(self.mesh, self.rules):
      token_1, scores, self.state = self._insert(
        self.params,
        self.state,
        prompt,
        np.int32(row),
        bias_V,
        settings,
        do_sample=sampling["temperature"] > 0,
        score_prompt=score_prompt and self.can_score_prompt,
      )
    token_1, scores = jax.device_get((token_1, scores))
    return int(token_1[0]), scores

  def step(self, tokens_B: np.ndarray, settings: dict) -> tuple[np.ndarray, dict]:
    """One decode step of every slot (idle ones too: their rows are ignored).

    Args:
      tokens_B: each row's last token.
      settings: per-row arrays 'seeds_B', 't_B' (the row's step: tokens generated so far), 'temperature_B',
        'top_k_B', 'top_p_B', 'presence_B', 'frequency_B'.

    Returns:
      (next tokens B, scores as `insert`'s without 'prompt_*'), numpy.
    """
    do_sample = bool(np.any(settings["temperature_B"] > 0))
    with decode.on_mesh(self.mesh, self.rules):
      next_B, scores, self.state = self._step(self.params, self.state, tokens_B, settings, do_sample=do_sample)
    return jax.device_get((next_B, scores))


# --- The engine: requests in slots, their text streamed back ----------------------------------------


@dataclasses.dataclass
class Job:
  """One completion (one of a request's choices), filled by the decode thread.

  `sampling`: {'temperature', 'top_k', 'top_p', 'seed', 'presence_penalty', 'frequency_penalty',
  'logit_bias' ({id: bias})}. `chat_logprobs`: log-probabilities in the chat shape (`openai.chat_logprobs`)
  rather than the completions one.
  """

  index: int
  ids: list[int]
  max_tokens: int
  sampling: dict
  output: text_lib.TextStream  # the completion's tokens and the text already sent
  events: object  # an asyncio.Queue shared by the request's choices: (index, event) pairs
  loop: object  # its event loop
  logprobs: int | None = None
  echo_text: str | None = None  # the prompt, when `echo`
  prompt_start: int = 0  # ids[prompt_start:] are the prompt's own tokens (after the prefix)
  text_base: int = 0  # characters before the completion: completion text offsets start here
  chat_logprobs: bool = False
  scores: list[tuple] = dataclasses.field(default_factory=list)  # (logprob, top ids, top logprobs) per token
  scored_sent: int = 0  # tokens whose log-probabilities were already sent
  done: bool = False
  cancelled: bool = False  # the client went away: decode no further

  def put(self, event: dict) -> None:
    """Hands `event` to the request's event loop."""
    self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


class Engine:
  """The decode worker: takes queued jobs into free slots between decode steps and streams their text back.

  Args:
    decoder: a `SlotDecoder` (or an object with its `slots`, `cfg`, `insert` and `step`).
    tokenizer: decodes the tokens.
    stop_ids: ids that end a completion.
    policy: 'continuous' (jobs join between steps) or 'static' (only when every slot is free).

  Attributes:
    jobs: the queue requests put their jobs in.
    steps: decode steps run so far.
    admitted: jobs taken into slots so far.
  """

  def __init__(self, decoder: SlotDecoder, tokenizer, stop_ids=(), policy: str = "continuous"):
    self.decoder, self.tokenizer, self.policy = decoder, tokenizer, policy
    self.stop_ids = set(int(i) for i in stop_ids)
    self.jobs: queue.Queue[Job] = queue.Queue()
    self.steps = self.admitted = 0
    self.rows: list[Job | None] = [None] * decoder.slots
    slots = decoder.slots
    self.settings = {
      "seeds_B": np.zeros(slots, np.uint32),
      "t_B": np.zeros(slots, np.int32),
      "temperature_B": np.zeros(slots, np.float32),
      "top_k_B": np.zeros(slots, np.int32),
      "top_p_B": np.ones(slots, np.float32),
      "presence_B": np.zeros(slots, np.float32),
      "frequency_B": np.zeros(slots, np.float32),
    }
    self.tokens_B = np.zeros(slots, np.int32)
    threading.Thread(target=self._work, daemon=True, name="jaxlm-decode").start()

  def _work(self) -> None:
    while True:
      try:
        self._admit()
        if any(self.rows):
          self._step()
      except Exception as e:  # a failed step answers its requests; the server keeps serving
        LOG.exception("decoding failed")
        for job in self.rows:
          if job is not None and not job.done:
            job.put({"error": f"decoding failed: {type(e).__name__}: {e}"})
        self.rows = [None] * self.decoder.slots
        self.decoder.state = self.decoder.empty_state()  # the failed call may have consumed the donated state

  def _admit(self) -> None:
    """Frees finished slots and fills free ones from the queue (waiting for a job when no slot is busy)."""
    self.rows = [None if job is None or job.done or job.cancelled else job for job in self.rows]
    if self.policy == "static" and any(self.rows):
      return
    while None in self.rows:
      try:
        job = self.jobs.get(block=not any(self.rows))
      except queue.Empty:
        return
      if job.cancelled:
        continue
      row = self.rows.index(None)
      self.rows[row] = job  # a failing prefill fails it with the others (`_work`)
      self._start(row, job)
      if self.policy == "static" and self.jobs.empty():
        time.sleep(0.002)  # let requests that arrive together share the batch

  def _start(self, row: int, job: Job) -> None:
    """Prefills `job` into slot `row` and sends its first token."""
    sampling = job.sampling
    score_prompt = job.logprobs is not None and job.echo_text is not None
    token, scores = self.decoder.insert(row, job.ids, sampling, sampling.get("logit_bias", {}), score_prompt)
    self.admitted += 1
    for name, key in (
      ("seeds_B", "seed"),
      ("temperature_B", "temperature"),
      ("top_k_B", "top_k"),
      ("top_p_B", "top_p"),
      ("presence_B", "presence_penalty"),
      ("frequency_B", "frequency_penalty"),
    ):
      self.settings[name][row] = sampling.get(key, 0)
    self.settings["t_B"][row] = 1
    self.tokens_B[row] = token
    if job.echo_text is not None:
      job.put({"text": job.echo_text, "logprobs": self._prompt_logprobs(job, scores)})
    self._take(row, job, token, scores, 0)

  def _step(self) -> None:
    tokens_B, scores = self.decoder.step(self.tokens_B, self.settings)
    self.steps += 1
    self.settings["t_B"] += 1
    self.tokens_B = np.array(tokens_B, np.int32)
    for row, job in enumerate(self.rows):
      if job is not None and not job.done:
        self._take(row, job, int(tokens_B[row]), scores, row)

  def _take(self, row: int, job: Job, token: int, scores: dict, index: int) -> None:
    """Adds the token the slot produced (scores row `index`) to its job, finishing it at a stop or its limit."""
    if job.cancelled:
      job.done = True
      return
    stopped = token in self.stop_ids
    if not stopped and job.logprobs is not None:
      job.scores.append((scores["logprob_B"][index], scores["top_ids_BxK"][index], scores["top_logprobs_BxK"][index]))
    finished = stopped or len(job.output.tokens) + 1 >= job.max_tokens
    self._emit(job, None if stopped else token, "stop" if stopped else ("length" if finished else None))

  def _logprobs(self, job: Job, ids, scores, offsets) -> dict | None:
    if job.logprobs is None:
      return None
    if job.chat_logprobs:
      return openai.chat_logprobs(self.tokenizer, ids, scores, job.logprobs)
    return scoring.logprobs_object(self.tokenizer, ids, scores, offsets, job.logprobs)

  def _prompt_logprobs(self, job: Job, scores: dict) -> dict | None:
    if job.logprobs is None:
      return None
    ids = job.ids[job.prompt_start :]
    # Position j of prompt_* scores token j + 1 of the row (the first token has no context).
    positions = range(job.prompt_start - 1, len(job.ids) - 1)
    if "prompt_logprob_BxP" in scores:
      rows = [
        (
          scores["prompt_logprob_BxP"][0, j],
          scores["prompt_top_ids_BxPxK"][0, j],
          scores["prompt_top_logprobs_BxPxK"][0, j],
        )
        if j >= 0
        else (None, None, None)
        for j in positions
      ]
    else:  # the prompt was a source for an encoder: it has no log-probabilities of its own
      rows = [(None, None, None)] * len(ids)
    return self._logprobs(job, ids, rows, scoring.char_offsets(self.tokenizer, ids, 0, len(ids)))

  def _emit(self, job: Job, token: int | None, reason: str | None) -> None:
    """Adds `token` (None: none) and sends the completion text that is final (`jaxlm.inference.text`)."""
    output = job.output
    piece = output.push(token, last=reason is not None)
    if output.stopped:
      reason = "stop"
    if reason is None:
      if piece:
        job.put({"text": piece, "logprobs": self._completion_logprobs(job, output.sent)})
      return
    job.done = True
    logprobs = self._completion_logprobs(job, output.sent if output.stopped else None)
    job.put({"text": piece, "logprobs": logprobs, "finish_reason": reason, "completion_tokens": len(output.tokens)})

  def _completion_logprobs(self, job: Job, ready: int | None) -> dict | None:
    """Log-probabilities of the tokens not yet sent that begin before character `ready` of the completion
    (None: all of them)."""
    if job.logprobs is None:
      return None
    tokens = job.output.tokens
    offsets = scoring.char_offsets(self.tokenizer, tokens, job.scored_sent, len(tokens))
    count = len(offsets) if ready is None else sum(1 for o in offsets if o < ready)
    start, job.scored_sent = job.scored_sent, job.scored_sent + count
    return self._logprobs(
      job,
      tokens[start : job.scored_sent],
      job.scores[start : job.scored_sent],
      [job.text_base + o for o in offsets[:count]],
    )
