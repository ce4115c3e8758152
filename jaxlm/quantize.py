"""int8 weight-only post-training quantization: per-channel symmetric, dequantized on the fly.

Every matmul kernel and the token embedding become {'int8': q, 'scale': s}
with w ~= q * s: s holds one float per output channel (per vocabulary row for
the embedding, which is both the lookup table and the tied output layer), so
a channel's outliers do not cost the others their precision. Norms, biases
and position tables stay float; they are a negligible share of the bytes.

Why hand-written rather than Qwix (0.1.x) or AQT: both rewrite the model's
dot_generals into integer ones and keep quantized weights in their own
pytree types. On CPU, XLA's int8 dots are not faster than float ones, and
those types would not pass through our Orbax checkpoints, `jax.export`
artifacts or the Hugging Face converter, while a plain dict of int8 arrays
and scales does. Weight-only quantization needs just the ~40 lines below:
`materialize` runs inside the jitted decode functions, so the weights stay
int8 in memory between calls and are widened per call.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED_KEYS = frozenset({"int8", "scale"})


def _is_quantized(node) -> bool:
  return isinstance(node, dict) and set(node) == QUANTIZED_KEYS


def _reduce_axes(names: list[str], ndim: int) -> tuple[int, ...] | None:
  """The input axes of a kernel (reduced over for its per-channel scale), or None to leave the leaf float."""
  offset = 1 if "layers" in names else 0  # scan_layers stacks a leading layer axis
  if names[-1] == "embedding" and names[-2] == "token":
    return (ndim - 1,)  # one scale per vocabulary row
  if names[-1] == "kernel":
    # The attention output kernel is N x H x D (two input axes); every other kernel has one.
    num_inputs = 2 if names[-2] == "out" else 1
    return tuple(range(offset, offset + num_inputs))
  return None


def quantize_params(params):
  """A params tree with int8 kernels and token embedding; other leaves unchanged."""
  def visit(node, names):
    if isinstance(node, dict):
      return {k: visit(v, names + [k]) for k, v in node.items()}
    axes = _reduce_axes(names, np.ndim(node))
    if axes is None:
      return node
    w = jnp.asarray(node, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {"int8": q, "scale": scale.astype(node.dtype)}
  return visit(dict(params), [])


def materialize(params):
  """Float weights from a (possibly) quantized tree; the identity on a float tree."""
  if not isinstance(params, dict):
    return params
  if _is_quantized(params):
    return params["int8"].astype(params["scale"].dtype) * params["scale"]
  return {k: materialize(v) for k, v in params.items()}


def is_quantized(params) -> bool:
  return any(_is_quantized(n) for n in _nodes(params))


def _nodes(node):
  yield node
  if isinstance(node, dict) and not _is_quantized(node):
    for v in node.values():
      yield from _nodes(v)


def nbytes(params) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def compare(workdir, step: int | None = None, max_batches: int | None = None) -> dict:
  """Weight bytes and validation perplexity of a run, float vs int8, side by side."""
  import math
  from jaxlm import data as data_lib, loader, train_step, trainer
  run = loader.load(workdir, step)
  config = run.config
  int8 = quantize_params(run.params)
  sums = jax.jit(lambda p, batch: train_step.batch_sums(run.model, materialize(p), batch, config.train))
  rows = trainer.prepare_data(config, run.tokenizer, "validation")
  limit = config.eval.max_batches if max_batches is None else max_batches
  totals = {"float": [0.0, 0.0], "int8": [0.0, 0.0]}
  for batch in data_lib.eval_batches(rows, config.eval.batch_size, limit):
    for name, params in (("float", run.params), ("int8", int8)):
      out = sums(params, batch)
      totals[name][0] += float(out["nll_sum"])
      totals[name][1] += float(out["weight_sum"])
  ppl = {name: math.exp(nll / max(weight, 1.0)) for name, (nll, weight) in totals.items()}
  float_bytes, int8_bytes = nbytes(run.params), nbytes(int8)
  result = {"step": run.step, "tokens": totals["float"][1], "float_mb": float_bytes / 2**20,
            "int8_mb": int8_bytes / 2**20, "memory_reduction": float_bytes / int8_bytes,
            "float_perplexity": ppl["float"], "int8_perplexity": ppl["int8"],
            "perplexity_change": ppl["int8"] / ppl["float"] - 1}
  (Path(workdir) / f"quantize_step_{run.step}.json").write_text(json.dumps(result, indent=2))
  return result
