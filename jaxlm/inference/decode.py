"""Cached decoding: a jitted prefill and decode step, sampling, streaming and beam search.

Layout of the cache: a batch of prompts is right-padded to a bucketed length
P and written into cache slots [0, P) by one prefill call; the t-th generated
token of every row then goes to slot P + t. Each row keeps its own positions
(its prompt length + t) and `kv_segment_ids_BxS` marks the slots that hold
real tokens, so padding is never attended and a mixed-length batch decodes
exactly as each prompt alone. Every shape is fixed by (batch, P, cache
length), so one compiled step serves every token of a generation.

The family-specific part is an `Adapter` with `prefill` and `step`, which
each generating family of `jaxlm.families` provides; sampling, streaming and
beam search see only the adapter, so every family shares them. Shape letters as in `jaxlm.models.layers`;
W is the beam size, L the number of new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxlm import families  # families imports no model code until a lookup
from jaxlm.errors import JaxlmError
from jaxlm.models import quantize

if TYPE_CHECKING:
  from jaxlm.config import ModelConfig

Array = jax.Array
PROMPT_BUCKET = 16  # prompt lengths round up to this, so few prefill shapes get compiled
CACHE_BUCKET = 64


class DecodeError(JaxlmError, ValueError):
  """A request the model cannot serve (empty prompt, too long...); one line naming the field."""


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


# --- Adapters: the family-specific prefill and step -------------------------------------------------


class Adapter:
  """A family's decoding: prefill writes the prompt into a fresh cache; step feeds one token per row.

  Each generating family (`jaxlm.families`) subclasses this with `prefill`, `_apply`, `_cache_shapes` and
  `prompt_ids`, and says whether the prompt occupies the generated sequence's positions and cache slots
  (`prompt_in_cache`: a decoder continues its prompt; an encoder-decoder encodes it and starts from BOS).
  State is {'cache': the model's 'cache' collection, 'rows': per-row arrays
  (batch axis 0), 'slot': the next cache slot, shared by all rows}.
  """

  prompt_in_cache: bool = True

  def __init__(self, model_cfg: ModelConfig, module):
    """`model_cfg`: the model sub-config; `module`: the family's model built with `decode=True`."""
    self.cfg = model_cfg
    self.module = module

  def prompt_ids(self, tokenizer, text: str) -> list[int]:
    """The token ids a text prompt decodes from."""
    raise NotImplementedError

  def prompt_slots(self, prompt_width: int) -> int:
    """Cache slots the prompt takes: its width when it is in the cache, else one (the start token)."""
    return prompt_width if self.prompt_in_cache else 1

  def prefill(self, params, prompt, cache_len: int):
    """`prompt`: {'tokens_BxP': right-padded ids, 'lengths_B'}; returns (logits B x P x V, next B x V, state)."""
    raise NotImplementedError

  def _apply(self, params, cache, rows, tokens_BxT, segment_BxT, positions_BxT, slots_BxT, kv_segment_BxS):
    raise NotImplementedError

  def _cache_shapes(self, params, rows, batch: int, cache_len: int):
    raise NotImplementedError

  def _decode_prompt(self, params, cache, rows, tokens_BxP, lengths_B, cache_len: int):
    """Writes right-padded prompts into slots [0, P); returns all logits, the next-token logits and the state."""
    batch, prompt_len = tokens_BxP.shape
    slots_P = jnp.arange(prompt_len, dtype=jnp.int32)
    segment_BxP = (slots_P[None] < lengths_B[:, None]).astype(jnp.int32)
    slots_BxP = jnp.broadcast_to(slots_P, (batch, prompt_len))
    kv_segment_BxS = (jnp.arange(cache_len)[None] < lengths_B[:, None]).astype(jnp.int32)
    logits_BxPxV, cache = self._apply(
      params, cache, rows, tokens_BxP, segment_BxP, slots_BxP, slots_BxP, kv_segment_BxS
    )
    next_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    rows = dict(rows, kv_segment_ids_BxS=kv_segment_BxS, positions_B=lengths_B)
    return logits_BxPxV, next_BxV, constrain({"cache": cache, "rows": rows, "slot": jnp.int32(prompt_len)})

  def step(self, params, state, tokens_B):
    """One token per row at slot `state['slot']`, position `rows['positions_B']`; returns logits B x V."""
    rows, slot = state["rows"], state["slot"]
    kv_segment_BxS = rows["kv_segment_ids_BxS"].at[:, slot].set(1)
    ones_Bx1 = jnp.ones_like(tokens_B)[:, None]
    logits_Bx1xV, cache = self._apply(
      params,
      state["cache"],
      rows,
      tokens_B[:, None],
      ones_Bx1,
      rows["positions_B"][:, None],
      ones_Bx1 * slot,
      kv_segment_BxS,
    )
    rows = dict(rows, kv_segment_ids_BxS=kv_segment_BxS, positions_B=rows["positions_B"] + 1)
    return logits_Bx1xV[:, 0], constrain({"cache": cache, "rows": rows, "slot": slot + 1})

  def ring_step(self, params, state, tokens_B):
    """`step` for rows that joined at different times (`jaxlm.inference.batching`), the cache a ring.

    Every row writes at the shared index `state['slot']`, which wraps at the cache length, from its own
    position; a row's earlier tokens may lie on either side of that index, so the causal order is the
    filled slots of the row (`kv_segment_ids_BxS`) alone: each query is placed at the last slot. Positions
    stop at `model.max_len - 1`, so an idle row (its request done) can step on harmlessly.

    Args:
      params: the model's parameters.
      state: as `step`'s.
      tokens_B: one token per row.

    Returns:
      (logits B x V, the state with the token written and the index advanced).
    """
    rows, slot = state["rows"], state["slot"]
    cache_len = rows["kv_segment_ids_BxS"].shape[1]
    set_index = lambda path, x: jnp.full_like(x, slot) if getattr(path[-1], "key", "") == "cache_index" else x
    cache = jax.tree_util.tree_map_with_path(set_index, state["cache"])
    kv_segment_BxS = rows["kv_segment_ids_BxS"].at[:, slot].set(1)
    ones_Bx1 = jnp.ones_like(tokens_B)[:, None]
    logits_Bx1xV, cache = self._apply(
      params,
      cache,
      rows,
      tokens_B[:, None],
      ones_Bx1,
      rows["positions_B"][:, None],
      ones_Bx1 * (cache_len - 1),
      kv_segment_BxS,
    )
    positions_B = jnp.minimum(rows["positions_B"] + 1, self.cfg.max_len - 1)
    rows = dict(rows, kv_segment_ids_BxS=kv_segment_BxS, positions_B=positions_B)
    return logits_Bx1xV[:, 0], constrain({"cache": cache, "rows": rows, "slot": (slot + 1) % cache_len})

  def _zero_cache(self, params, rows, batch: int, cache_len: int):
    shapes = self._cache_shapes(params, rows, batch, cache_len)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def adapter_for(model_cfg: ModelConfig, start_id: int = 1) -> Adapter:
  """The decoding adapter of `model_cfg.family` (the model sub-config); DecodeError if it does not generate."""
  family = families.get(model_cfg.family)
  if family.adapter is None:
    raise DecodeError(
      f"model.family '{model_cfg.family}' does not generate text; decoding needs one of "
      + ", ".join(name for name in families.names() if families.get(name).adapter)
    )
  return family.adapter(model_cfg, start_id)


def map_rows(fn, state):
  """Applies `fn(array, batch_axis)` to every per-row array of a decode state (cache included)."""

  def cache_leaf(path, x):
    name = getattr(path[-1], "key", "")
    # cached_key/value are B x S x K x H, with a leading layer axis under scan_layers; so is cached_position
    # (ALiBi's key positions), B x S.
    if name == "cached_position":
      return fn(x, x.ndim - 2)
    return fn(x, x.ndim - 4) if name in ("cached_key", "cached_value") else x

  return {
    "cache": jax.tree_util.tree_map_with_path(cache_leaf, state["cache"]),
    "rows": jax.tree.map(lambda x: fn(x, 0), state["rows"]),
    "slot": state["slot"],
  }


# The cache's sharding, declared once by logical name: cached_key/value are B x S x K x H (a leading layer
# axis under scan_layers), split along batch and kv heads, which the mesh rules (`mesh.rules`) map onto the
# data and tensor axes. Decoding is bound by reading the cache, so each device reads only its share.
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


def state_logical_axes(state):
  """PartitionSpecs of logical axis names for a decode state (arrays or their shapes): the cache by
  CACHE_AXES, the other per-row arrays by 'batch' along axis 0, the rest (slot, cache indices) replicated."""

  def axes(x, batch_axis):
    if x.ndim >= 4 and batch_axis == x.ndim - 4:
      return PartitionSpec(*(("layers",) * batch_axis + CACHE_AXES))
    return PartitionSpec(*([None] * batch_axis + ["batch"] + [None] * (x.ndim - 1 - batch_axis)))

  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(lambda x: x if is_spec(x) else PartitionSpec(), map_rows(axes, state), is_leaf=is_spec)


def state_shardings(mesh: jax.sharding.Mesh, rules, state):
  """NamedShardings of a decode state (arrays or their shapes) on `mesh` by the logical `rules`."""
  import flax.linen as nn  # local: exported artifacts decode without Flax (see `jaxlm.inference.export`)

  return nn.logical_to_mesh_sharding(state_logical_axes(state), mesh, rules)


def constrain(state):
  """The decode state constrained to its declared sharding; a no-op unless called under
  `nn.logical_axis_rules` (see `on_mesh`), so one-device decoding is unchanged."""
  import flax.linen as nn

  return nn.with_logical_constraint(state, state_logical_axes(state))


@contextlib.contextmanager
def on_mesh(mesh: jax.sharding.Mesh | None, rules=()):
  """Runs (and traces) decoding under `mesh` and the logical `rules` (the whole config's
  `config.mesh_rules`), which `constrain` and the model's constraints read; nothing when `mesh` is None."""
  if mesh is None:
    yield
    return
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    if rules:
      import flax.linen as nn

      stack.enter_context(nn.logical_axis_rules(rules))
    yield


# --- Sampling ---------------------------------------------------------------------------------------


def sample(logits_BxV: Array, keys_B: Array, temperature_B: Array, top_k_B: Array, top_p_B: Array) -> Array:
  """Per-row temperature, top-k (0 = off) and top-p (1 = off); temperature 0 is greedy.

  Filters apply in Hugging Face's order: temperature, then top-k, then top-p
  over what top-k kept. Each row samples with its own key, so a row's tokens
  do not depend on the other rows of the batch.
  """
  logits = logits_BxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature_B, 1e-6)[:, None]
  sorted_BxV = -jnp.sort(-scaled, axis=-1)
  rank_V = jnp.arange(vocab)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
  in_top_k = rank_V[None] < k_B[:, None]
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k, sorted_BxV, -jnp.inf), axis=-1)
  # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
  keep = in_top_k & ((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p_B[:, None])
  threshold_B = jnp.take_along_axis(sorted_BxV, (jnp.sum(keep, axis=-1) - 1)[:, None], axis=-1)
  filtered = jnp.where(scaled >= threshold_B, scaled, -jnp.inf)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered).astype(jnp.int32)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


@dataclasses.dataclass
class Sampling:
  """Per-row sampling settings; scalars broadcast to the batch."""

  temperature: float | Sequence[float] = 0.0
  top_k: int | Sequence[int] = 0
  top_p: float | Sequence[float] = 1.0
  seed: int | Sequence[int] = 0

  def arrays(self, batch: int) -> dict[str, Array]:
    """{'seeds_B', 'temperature_B', 'top_k_B', 'top_p_B'}: the settings broadcast to `batch` rows."""
    full = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype), (batch,)).copy()
    return {
      "seeds_B": jnp.asarray(full(self.seed, np.uint32)),
      "temperature_B": jnp.asarray(full(self.temperature, np.float32)),
      "top_k_B": jnp.asarray(full(self.top_k, np.int32)),
      "top_p_B": jnp.asarray(full(self.top_p, np.float32)),
    }


def choose(logits_BxV, sampling: dict, t, do_sample: bool) -> Array:
  """The next token of each row (B int32): argmax, or `sample` with the `Sampling.arrays` settings at step t."""
  if not do_sample:  # static: an all-greedy batch skips the sort
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  # Raw uint32 seeds rather than key arrays: exported artifacts (`jax.export`) take plain integer arrays.
  keys_B = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), t))(sampling["seeds_B"])
  return sample(logits_BxV, keys_B, sampling["temperature_B"], sampling["top_k_B"], sampling["top_p_B"])


# --- Streaming generation ---------------------------------------------------------------------------


class StepOutput(NamedTuple):
  """One decode step of `Generator.stream`: per-row arrays of length B."""

  tokens_B: np.ndarray  # the token each row produced at this step
  emit_B: np.ndarray  # row produced a regular token (not a stop token, not already finished)
  stopped_B: np.ndarray  # row produced a stop token at this step
  finished_B: np.ndarray  # row is finished after this step (stop token or its max_new_tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], batch: int, width: int | None = None):
  """Right-padded B x P ids (P: `width`, else the longest rounded up to PROMPT_BUCKET) and lengths.

  Rows past the prompts are dummies."""
  lengths = [len(p) for p in prompts] + [1] * (batch - len(prompts))
  if width is not None and max(lengths) > width:
    raise DecodeError(f"a prompt has {max(lengths)} tokens; this generator takes at most {width}")
  tokens = np.zeros((batch, width or round_up(max(lengths), PROMPT_BUCKET)), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  return tokens, np.asarray(lengths, np.int32)


def check_request(
  model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], prompt_in_cache: bool = True
) -> None:
  """DecodeError naming the field if a prompt is empty or prompt + new tokens exceed `model_cfg.max_len`."""
  for i, (p, n) in enumerate(zip(prompts, max_new_tokens)):
    if len(p) == 0:
      raise DecodeError(f"prompt {i} is empty; give at least one token")
    if n < 1:
      raise DecodeError(f"max_tokens must be at least 1, got {n}")
    # Positions run to prompt + new tokens when the prompt is in the sequence, else to the new tokens.
    used = (len(p) if prompt_in_cache else 0) + n
    if used > model_cfg.max_len or len(p) > model_cfg.max_len:
      raise DecodeError(
        f"prompt {i} ({len(p)} tokens) + max_tokens ({n}) exceeds the model's context of "
        f"{model_cfg.max_len} (model.max_len); shorten the prompt or lower max_tokens"
      )


class Generator:
  """Jitted prefill and step for one model and its parameters (float or int8, see `jaxlm.models.quantize`)."""

  prompt_len: int | None = None  # a fixed prompt width (exported artifacts); None buckets per batch
  mesh: jax.sharding.Mesh | None = None  # the mesh the params are on; None: one device
  rules = ()

  def __init__(
    self,
    model_cfg: ModelConfig,
    params,
    cache_len: int | None = None,
    start_id: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    rules=(),
  ):
    """`model_cfg`: the model sub-config; `params`: its parameters (float, or int8 from `jaxlm.models.quantize`);
    `cache_len`: a fixed cache length (None: per call); `start_id`: BOS, an encoder-decoder's first token;
    `mesh`: the mesh `params` are sharded on (`jaxlm.load(..., mesh=)`), with the logical `rules` of the
    whole config (`config.mesh_rules`): the cache is then sharded as `CACHE_AXES` declares."""
    self.cfg, self.params, self.cache_len = model_cfg, params, cache_len
    self.mesh, self.rules = mesh, rules
    self.adapter = adapter_for(model_cfg, start_id)
    self.prompt_in_cache = self.adapter.prompt_in_cache
    self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "do_sample"))
    self.step = jax.jit(self._step, static_argnames=("do_sample",), donate_argnums=(1,))

  def _prefill(self, params, prompt, sampling, cache_len: int, do_sample: bool):
    _, next_BxV, state = self.adapter.prefill(quantize.materialize(params), prompt, cache_len)
    return choose(next_BxV, sampling, 0, do_sample), state

  def _step(self, params, state, tokens_B, sampling, t, do_sample: bool):
    logits_BxV, state = self.adapter.step(quantize.materialize(params), state, tokens_B)
    return choose(logits_BxV, sampling, t, do_sample), state

  def stream(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    sampling: Sampling = None,
    stop_ids: Sequence[int] = (),
    batch_size: int | None = None,
  ) -> Iterator[StepOutput]:
    """Yields one StepOutput per decode step until every row is finished.

    `batch_size` pads the batch with dummy rows, so a server compiles one
    step for any number of waiting requests.
    """
    sampling = sampling or Sampling()
    n = len(prompts)
    batch = batch_size or n
    if n > batch:
      raise DecodeError(f"{n} prompts do not fit a batch of {batch}")
    max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (n,))
    check_request(self.cfg, prompts, max_new, self.prompt_in_cache)
    tokens_BxP, lengths_B = pad_prompts(prompts, batch, self.prompt_len)
    prompt_slots = tokens_BxP.shape[1] if self.prompt_in_cache else 1  # else BOS alone, in slot 0
    slots_needed = prompt_slots + int(max_new.max())
    cache_len = self.cache_len or round_up(slots_needed, CACHE_BUCKET)
    if slots_needed > cache_len:
      raise DecodeError(
        f"prompt + max_tokens needs {slots_needed} cache slots but the cache has {cache_len}; "
        "lower max_tokens or raise the cache length"
      )
    row_sampling = dataclasses.replace(
      sampling, **{f.name: _pad_rows(getattr(sampling, f.name), n, batch) for f in dataclasses.fields(sampling)}
    )
    arrays = row_sampling.arrays(batch)
    do_sample = bool(np.any(np.asarray(row_sampling.temperature) > 0))
    prompt = {"tokens_BxP": jnp.asarray(tokens_BxP), "lengths_B": jnp.asarray(lengths_B)}
    with on_mesh(self.mesh, self.rules):
      tokens, state = self.prefill(self.params, prompt, arrays, cache_len=cache_len, do_sample=do_sample)
    finished = np.zeros(batch, bool)
    finished[n:] = True
    counts = np.zeros(batch, np.int64)
    limit = np.concatenate([max_new, np.zeros(batch - n, np.int64)])
    stop = np.asarray(list(stop_ids), np.int64)
    for t in range(int(max_new.max())):
      tokens_B = np.asarray(tokens)
      live = ~finished
      stopped = live & np.isin(tokens_B, stop)
      emit = live & ~stopped
      counts += live
      finished = finished | stopped | (counts >= limit)
      yield StepOutput(tokens_B, emit, stopped, finished.copy())
      if finished.all():
        return
      with on_mesh(self.mesh, self.rules):
        tokens, state = self.step(self.params, state, tokens, arrays, jnp.int32(t + 1), do_sample=do_sample)

  def generate(self, prompts, max_new_tokens, sampling: Sampling = None, stop_ids=(), batch_size=None):
    """The new tokens of each prompt (stop tokens excluded), as lists of ints."""
    outputs = [[] for _ in prompts]
    for out in self.stream(prompts, max_new_tokens, sampling, stop_ids, batch_size):
      for i in np.flatnonzero(out.emit_B[: len(prompts)]):
        outputs[i].append(int(out.tokens_B[i]))
    return outputs


def _pad_rows(value, n: int, batch: int):
  """A per-row setting for n rows, extended to `batch` with the first row's (dummy rows)."""
  values = np.broadcast_to(np.asarray(value), (n,))
  return np.concatenate([values, np.repeat(values[:1], batch - n)])


# --- Beam search ------------------------------------------------------------------------------------


class BeamResult(NamedTuple):
  """What `beam_search` returns for a batch of prompts."""

  tokens: list[list[int]]  # best hypothesis per prompt, stop token excluded
  scores: list[float]  # its length-normalized log-probability
  all_tokens: list[list[list[int]]]  # every finished beam per prompt, best first
  all_scores: list[list[float]]


def length_penalty(length, alpha: float):
  """GNMT's ((5 + |Y|) / 6)^alpha (Wu et al., 2016); |Y| counts the generated tokens, EOS included."""
  return ((5.0 + length) / 6.0) ** alpha


class BeamSearcher:
  """Beam search on the same cache as sampling: rows are (prompt, beam) pairs, reordered after each step.

  Keeps W alive beams (raw log-probabilities) and W finished ones (scores
  divided by the length penalty), as in t5x. A batch row stops early once
  its best alive beam, even at full length with no further loss, cannot beat
  its worst finished beam.
  """

  def __init__(self, model_cfg: ModelConfig, params, start_id: int = 1):
    """`model_cfg`: the model sub-config; `params`: its parameters; `start_id`: an encoder-decoder's BOS."""
    self.cfg, self.params = model_cfg, params
    self.adapter = adapter_for(model_cfg, start_id)
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len", "beam_size"))
    self._step = jax.jit(self._step_fn, static_argnames=("max_new", "alpha", "eos_id"), donate_argnums=(1,))

  def _prefill_fn(self, params, prompt, cache_len: int, beam_size: int):
    _, next_BxV, state = self.adapter.prefill(quantize.materialize(params), prompt, cache_len)
    state = map_rows(lambda x, axis: jnp.repeat(x, beam_size, axis=axis), state)
    return jnp.repeat(next_BxV, beam_size, axis=0), state

  def _step_fn(self, params, beams, logits_BWxV, t, max_new: int, alpha: float, eos_id: int):
    """Extends every beam by one token (the t-th), keeps the best W alive and W finished."""
    alive_logp_BxW = beams["alive_logp"]
    batch, width = alive_logp_BxW.shape
    logp_BxWxV = jax.nn.log_softmax(logits_BWxV.astype(jnp.float32)).reshape(batch, width, -1)
    vocab = logp_BxWxV.shape[-1]
    cand_BxWV = (alive_logp_BxW[:, :, None] + logp_BxWxV).reshape(batch, width * vocab)
    # 2W candidates guarantee W that do not end in EOS.
    top_logp_Bx2W, top_index_Bx2W = jax.lax.top_k(cand_BxWV, 2 * width)
    parent_Bx2W, token_Bx2W = top_index_Bx2W // vocab, top_index_Bx2W % vocab
    seqs_Bx2WxL = jnp.take_along_axis(beams["alive_seq"], parent_Bx2W[:, :, None], axis=1)
    seqs_Bx2WxL = jax.lax.dynamic_update_slice(seqs_Bx2WxL, token_Bx2W[:, :, None], (0, 0, t))
    is_eos = token_Bx2W == eos_id
    ends = is_eos | (t + 1 == max_new)
    new_scores = jnp.where(ends, top_logp_Bx2W / length_penalty(t + 1.0, alpha), -jnp.inf)
    fin_scores = jnp.concatenate([beams["fin_score"], new_scores], axis=1)
    fin_seqs = jnp.concatenate([beams["fin_seq"], seqs_Bx2WxL], axis=1)
    fin_score_BxW, fin_index = jax.lax.top_k(fin_scores, width)
    fin_seq_BxWxL = jnp.take_along_axis(fin_seqs, fin_index[:, :, None], axis=1)
    alive_logp_BxW, alive_index = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp_Bx2W), width)
    alive_seq_BxWxL = jnp.take_along_axis(seqs_Bx2WxL, alive_index[:, :, None], axis=1)
    tokens_BW = jnp.take_along_axis(token_Bx2W, alive_index, axis=1).reshape(-1)
    rows_BW = (jnp.take_along_axis(parent_Bx2W, alive_index, axis=1) + jnp.arange(batch)[:, None] * width).reshape(-1)
    state = map_rows(lambda x, axis: jnp.take(x, rows_BW, axis=axis), beams["state"])
    logits_BWxV, state = self.adapter.step(quantize.materialize(params), state, tokens_BW)
    best_possible_B = alive_logp_BxW[:, 0] / length_penalty(float(max_new), alpha)
    done_B = fin_score_BxW[:, -1] > best_possible_B
    beams = {
      "alive_logp": alive_logp_BxW,
      "alive_seq": alive_seq_BxWxL,
      "fin_score": fin_score_BxW,
      "fin_seq": fin_seq_BxWxL,
      "state": state,
    }
    return beams, logits_BWxV, jnp.all(done_B)

  def search(
    self,
    prompts: Sequence[Sequence[int]],
    beam_size: int = 4,
    max_new_tokens: int = 64,
    eos_id: int = 2,
    alpha: float = 0.6,
    cache_len: int | None = None,
  ) -> BeamResult:
    """Beam search of width `beam_size` for each prompt (token ids), up to `max_new_tokens`, stopping beams
    at `eos_id`, ranked with GNMT's length penalty `alpha`."""
    batch = len(prompts)
    check_request(self.cfg, prompts, [max_new_tokens] * batch, self.adapter.prompt_in_cache)
    tokens_BxP, lengths_B = pad_prompts(prompts, batch)
    start = self.adapter.prompt_slots(tokens_BxP.shape[1])
    cache_len = cache_len or round_up(start + max_new_tokens, CACHE_BUCKET)
    prompt = {"tokens_BxP": jnp.asarray(tokens_BxP), "lengths_B": jnp.asarray(lengths_B)}
    logits, state = self._prefill(self.params, prompt, cache_len=cache_len, beam_size=beam_size)
    # Only beam 0 is alive at first, so the W copies of the prompt do not yield W equal beams.
    alive_logp = np.full((batch, beam_size), -np.inf, np.float32)
    alive_logp[:, 0] = 0.0
    empty = lambda: jnp.zeros((batch, beam_size, max_new_tokens), jnp.int32)  # two buffers: both are donated
    beams = {
      "alive_logp": jnp.asarray(alive_logp),
      "alive_seq": empty(),
      "fin_score": jnp.full((batch, beam_size), -jnp.inf),
      "fin_seq": empty(),
      "state": state,
    }
    for t in range(max_new_tokens):
      beams, logits, done = self._step(
        self.params, beams, logits, jnp.int32(t), max_new=max_new_tokens, alpha=float(alpha), eos_id=int(eos_id)
      )
      if bool(done):
        break
    seqs, scores = np.asarray(beams["fin_seq"]), np.asarray(beams["fin_score"])
    all_tokens = [
      [_until(seqs[b, w], eos_id) for w in range(beam_size) if np.isfinite(scores[b, w])] for b in range(batch)
    ]
    all_scores = [[float(s) for s in scores[b] if np.isfinite(s)] for b in range(batch)]
    return BeamResult([t[0] for t in all_tokens], [s[0] for s in all_scores], all_tokens, all_scores)


def _until(seq: np.ndarray, eos_id: int) -> list[int]:
  ends = np.flatnonzero(seq == eos_id)
  return [int(x) for x in (seq[: ends[0]] if len(ends) else seq)]


def beam_search(
  model_cfg: ModelConfig,
  params,
  prompts: Sequence[Sequence[int]],
  beam_size: int = 4,
  max_new_tokens: int = 64,
  eos_id: int = 2,
  alpha: float = 0.6,
  start_id: int = 1,
) -> BeamResult:
  """Beam search with GNMT length penalty. `prompts` are token ids: the text to continue for a decoder,
  the source for an encoder-decoder (whose target starts from `start_id`). For many batches, keep one
  `BeamSearcher` instead: it compiles once per shape."""
  return BeamSearcher(model_cfg, params, start_id).search(prompts, beam_size, max_new_tokens, eos_id, alpha)
