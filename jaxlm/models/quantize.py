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
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import JaxlmError
from jaxlm.storage import fs, run_dir

QUANTIZED_KEYS = frozenset({"int8", "scale"})
INT8_MARKER = "int8.json"  # marks a run directory written by `jaxlm quantize`


class QuantizeError(JaxlmError, ValueError):
  """A run that cannot be quantized as asked; one line naming the directory and the fix."""


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
  """True if any weight of `params` is an {'int8', 'scale'} pair."""
  return any(_is_quantized(n) for n in _nodes(params))


def _nodes(node):
  yield node
  if isinstance(node, dict) and not _is_quantized(node):
    for v in node.values():
      yield from _nodes(v)


def nbytes(params) -> int:
  """Bytes of all arrays in `params` (float or int8)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


# --- int8 runs: a run directory whose checkpoint holds int8 params -----------------------------------


def is_int8_run(workdir) -> bool:
  """True for a directory `jaxlm quantize` wrote (it holds INT8_MARKER)."""
  return fs.path(fs.join(workdir, INT8_MARKER)).exists()


def write_int8_run(run, int8_params, out, source) -> str:
  """Writes the run directory `out`: the run's config.json and tokenizer, INT8_MARKER (naming `source`) and a
  checkpoint at the run's step holding `int8_params` alone (no optimizer state), which `jaxlm.load` reads
  (see `abstract_int8`), so generate, serve and export take `--workdir out`. Returns `out`."""
  if run_dir.has_checkpoints(out):
    checkpoints = run_dir.checkpoints_path(out)
    if not is_int8_run(out):  # never overwrite what `jaxlm quantize` did not write
      raise QuantizeError(f"{checkpoints} already holds checkpoints of another run; pass another --out")
    checkpoints.rmtree()  # an earlier `jaxlm quantize` of this run: replaced by this one
  run_dir.write_run_files(out, run.config, run.tokenizer)
  fs.write_text(
    fs.join(out, INT8_MARKER),
    json.dumps(
      {
        "source": os.fspath(fs.absolute(source)),
        "step": run.step,
        "scheme": "int8 weight-only, per-channel symmetric (jaxlm.models.quantize)",
      },
      indent=2,
    ),
  )
  run_dir.write_checkpoint(out, run.step, {"params": int8_params}, run.config, keep=1)
  return out


def abstract_int8(target):
  """The restore target of an int8 run from its float one: a params tree of `jax.ShapeDtypeStruct` (with
  shardings) becomes the tree `quantize_params` makes, each int8 array sharded as its float weight and
  each (small) scale replicated."""
  from jax.sharding import NamedSharding, PartitionSpec

  def visit(node, names):
    if isinstance(node, dict):
      return {k: visit(v, names + [k]) for k, v in node.items()}
    axes = _reduce_axes(names, len(node.shape))
    if axes is None:
      return node
    scale_shape = tuple(1 if axis in axes else n for axis, n in enumerate(node.shape))
    sharding = node.sharding
    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding
    return {
      "int8": jax.ShapeDtypeStruct(node.shape, jnp.int8, sharding=sharding),
      "scale": jax.ShapeDtypeStruct(scale_shape, node.dtype, sharding=replicated),
    }

  return visit(dict(target), [])
