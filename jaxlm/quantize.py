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

from jaxlm import fs

QUANTIZED_KEYS = frozenset({"int8", "scale"})
INT8_MARKER = "int8.json"  # marks a run directory written by `jaxlm quantize`


class QuantizeError(ValueError):
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
  return any(_is_quantized(n) for n in _nodes(params))


def _nodes(node):
  yield node
  if isinstance(node, dict) and not _is_quantized(node):
    for v in node.values():
      yield from _nodes(v)


def nbytes(params) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def _score(run, params, batches) -> tuple[float, float]:
  """(summed negative log-likelihood, tokens) of `params` (float or int8) over `batches`."""
  from jaxlm import train_step
  sums = jax.jit(lambda p, batch: train_step.batch_sums(run.model, materialize(p), batch, run.config.train))
  nll = tokens = 0.0
  for batch in batches:
    out = sums(params, batch)
    nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["weight_sum"])
  return nll, tokens


def compare(workdir, step: int | None = None, max_batches: int | None = None, out=None) -> dict:
  """Quantizes a run to int8, writes the int8 run to `out` (default `workdir/int8`) and reports, side by
  side, the weight memory and validation perplexity of float and int8 weights.

  The float perplexity is taken from `workdir/eval_step_N.json` when `jaxlm eval` scored the same number
  of tokens of the same step there (`float_source` says which); otherwise the float weights are scored too.
  The report is also written to `workdir/quantize_step_N.json`.
  """
  import math
  from jaxlm import data as data_lib, loader, trainer
  if is_int8_run(workdir):
    raise QuantizeError(f"{workdir} is already an int8 run (written by `jaxlm quantize`); pass the float run")
  run = loader.load(workdir, step)
  int8 = quantize_params(run.params)
  out = fs.join(workdir, "int8") if out is None else os.fspath(out)
  write_int8_run(run, int8, out, workdir)
  rows = trainer.prepare_data(run.config, run.tokenizer, "validation")
  limit = run.config.eval.max_batches if max_batches is None else max_batches
  batches = list(data_lib.eval_batches(rows, run.config.eval.batch_size, limit))
  int8_nll, tokens = _score(run, int8, batches)
  eval_path = fs.path(fs.join(workdir, f"eval_step_{run.step}.json"))
  evaluated = json.loads(eval_path.read_text()) if eval_path.exists() else {}
  if evaluated.get("step") == run.step and evaluated.get("tokens") == tokens:
    float_loss, source = evaluated["loss"], eval_path.name
  else:
    float_loss, source = _score(run, run.params, batches)[0] / max(tokens, 1.0), "scored"
  ppl = {"float": math.exp(min(float_loss, 700)), "int8": math.exp(min(int8_nll / max(tokens, 1.0), 700))}
  float_bytes, int8_bytes = nbytes(run.params), nbytes(int8)
  result = {"step": run.step, "tokens": tokens, "float_mb": float_bytes / 2**20, "int8_mb": int8_bytes / 2**20,
            "memory_reduction": float_bytes / int8_bytes, "float_perplexity": ppl["float"],
            "int8_perplexity": ppl["int8"], "perplexity_change": ppl["int8"] / ppl["float"] - 1,
            "float_source": source, "int8_run": out}
  fs.write_text(fs.join(workdir, f"quantize_step_{run.step}.json"), json.dumps(result, indent=2))
  return result


# --- int8 runs: a run directory whose checkpoint holds int8 params -----------------------------------

def is_int8_run(workdir) -> bool:
  """True for a directory `jaxlm quantize` wrote (it holds INT8_MARKER)."""
  return fs.path(fs.join(workdir, INT8_MARKER)).exists()


def write_int8_run(run, int8_params, out, source) -> str:
  """Writes the run directory `out`: the run's config.json and tokenizer, INT8_MARKER (naming `source`) and a
  checkpoint at the run's step holding `int8_params` alone (no optimizer state), which `jaxlm.load` reads
  (see `abstract_int8`), so generate, serve and export take `--workdir out`. Returns `out`."""
  from jaxlm import checkpoint
  checkpoints = fs.path(fs.join(out, "checkpoints"))
  if checkpoints.exists() and any(checkpoints.iterdir()):
    if not is_int8_run(out):  # never overwrite what `jaxlm quantize` did not write
      raise QuantizeError(f"{checkpoints} already holds checkpoints of another run; pass another --out")
    checkpoints.rmtree()  # an earlier `jaxlm quantize` of this run: replaced by this one
  fs.makedirs(out)
  fs.write_text(fs.join(out, "config.json"), run.config.to_json(indent=2))
  run.tokenizer.save(fs.path(out))
  fs.write_text(fs.join(out, INT8_MARKER), json.dumps({
      "source": os.fspath(fs.absolute(source)), "step": run.step,
      "scheme": "int8 weight-only, per-channel symmetric (jaxlm.quantize)"}, indent=2))
  saver = checkpoint.Checkpointer(checkpoints, keep=1)
  saver.save(run.step, {"params": int8_params}, {"config": run.config.to_dict(), "data_position": run.step})
  saver.close()
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
    return {"int8": jax.ShapeDtypeStruct(node.shape, jnp.int8, sharding=sharding),
            "scale": jax.ShapeDtypeStruct(scale_shape, node.dtype, sharding=replicated)}
  return visit(dict(target), [])
