"""The dense op: x @ [W1 | W2 | ...] + [b1 | b2 | ...] as one matmul, split back per kernel.

Implementations of the one wide matmul take (x_MxI, kernel_IxC, bias_C or
None) and return y_MxC: "xla" (a dot) and "cpu" (MKL or OpenBLAS through
`cpu_kernels.dense`, chosen automatically on one CPU device in float32).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.ad_checkpoint import checkpoint_name

from jaxlm.ops import cpu_kernels, dispatch

Array = jax.Array

# The CPU dense kernel's outputs are matmul outputs too, but custom calls, not dots, so they carry
# this name for the `dots` remat policies (`layers.REMAT_POLICIES`).
CPU_DENSE = "cpu_dense"
_SEPARATE_BELOW_ROWS = 64


def _xla(x_MxI: Array, kernel_IxC: Array, bias_C: Array | None) -> Array:
  y_MxC = x_MxI @ kernel_IxC
  return y_MxC if bias_C is None else y_MxC + bias_C


def _cpu(x_MxI: Array, kernel_IxC: Array, bias_C: Array | None) -> Array:
  bias_C = jnp.zeros(kernel_IxC.shape[1], kernel_IxC.dtype) if bias_C is None else bias_C
  return checkpoint_name(cpu_kernels.dense(x_MxI, kernel_IxC, bias_C), CPU_DENSE)


dispatch.register("dense", "xla", dispatch.Implementation(_xla))
dispatch.register(
  "dense",
  "cpu",
  dispatch.Implementation(
    _cpu,
    **cpu_kernels.WHERE_THEY_RUN,
    available=lambda: cpu_kernels.available() and cpu_kernels.blas() is not None,
  ),
)


def projection(
  x_BxTxI: Array, projections: list[tuple[Array, Array | None]], dtype, model_cfg, split: bool = True
) -> list[Array] | Array:
  """x @ [W1 | W2 | ...] + [b1 | b2 | ...] in `dtype`, one output per (kernel, bias) pair.

  Kernels are (I, *features) with the same input size I; biases are
  `features`-shaped or None. Outputs are (B, T, *features). One wide matmul
  (and one of each in the backward pass) runs well above several narrow ones
  on CPU; see BENCHMARKS.md. `split=False` returns the (B, T, C) product
  unsplit, for a consumer that reads the parts in place.
  """
  b, t, i = x_BxTxI.shape
  x_MxI = rearrange(x_BxTxI, "B T I -> (B T) I").astype(dtype)
  if split and b * t <= _SEPARATE_BELOW_ROWS:
    # Decoding: with a few rows the matmuls are bound by reading the weights, and the
    # concatenation would copy every kernel once more per token.
    outputs = []
    for kernel, bias in projections:
      y_MxC = x_MxI @ kernel.reshape(i, -1).astype(dtype)
      if bias is not None:
        y_MxC = y_MxC + bias.reshape(-1).astype(dtype)
      outputs.append(y_MxC.reshape(b, t, *kernel.shape[1:]))
    return outputs
  widths = [math.prod(k.shape[1:]) for k, _ in projections]
  kernel_IxC = jnp.concatenate([k.reshape(i, -1) for k, _ in projections], axis=1).astype(dtype)
  has_bias = all(bias is not None for _, bias in projections)
  bias_C = jnp.concatenate([bias.reshape(-1) for _, bias in projections]).astype(dtype) if has_bias else None
  y_MxC = dispatch.implementation("dense", model_cfg, dtype).fn(x_MxI, kernel_IxC, bias_C)
  if not split:
    return y_MxC.reshape(b, t, -1)
  splits = jnp.split(y_MxC, list(itertools.accumulate(widths))[:-1], axis=1)
  return [y.reshape(b, t, *k.shape[1:]) for y, (k, _) in zip(splits, projections)]
