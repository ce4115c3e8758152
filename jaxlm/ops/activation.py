"""The activation op: bias add and a pointwise activation, by name.

`ACTIVATIONS` maps `model.mlp`'s ungated names to functions; add one there
(and to `model.mlp`'s choices in `jaxlm/config/schema.py`) to get a new MLP. Gated
MLPs (swiglu) use `ACTIVATIONS['silu']` on the gate. Implementations of
`bias_activation` take (x_MxF, bias_F or None, name) and return y_MxF: "xla",
and "cpu" (the fused float32 bias+GELU kernel of `cpu_kernels`, for "gelu"
only, chosen automatically on one CPU device).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.ops import cpu_kernels, dispatch

Array = jax.Array


def squared_relu(x: Array) -> Array:
  """relu(x)^2 (So et al. 2021, "Primer")."""
  return jnp.square(nn.relu(x))


ACTIVATIONS = {
  "gelu": functools.partial(nn.gelu, approximate=True),  # GPT-2's tanh approximation ("gelu_new")
  "gelu_exact": functools.partial(nn.gelu, approximate=False),  # BERT's erf form
  "relu": nn.relu,
  "squared_relu": squared_relu,
  "silu": nn.silu,
}


def _xla(x_MxF: Array, bias_F: Array | None, name: str) -> Array:
  if bias_F is not None:
    x_MxF = x_MxF + bias_F.astype(x_MxF.dtype)
  return ACTIVATIONS[name](x_MxF)


def _cpu(x_MxF: Array, bias_F: Array | None, name: str) -> Array:
  del name  # only "gelu" is registered
  return cpu_kernels.bias_gelu(
    x_MxF, jnp.zeros(x_MxF.shape[-1], jnp.float32) if bias_F is None else bias_F.astype(jnp.float32)
  )


dispatch.register("activation", "xla", dispatch.Implementation(_xla))
dispatch.register(
  "activation",
  "cpu",
  dispatch.Implementation(
    _cpu,
    **cpu_kernels.WHERE_THEY_RUN,
    available=cpu_kernels.available,
    variants=("gelu",),
  ),
)


def fuses_bias(name: str, model_cfg, dtype) -> bool:
  """Whether `bias_activation` adds the bias inside a fused kernel for this activation; callers then
  leave the bias out of the matmul before it (the kernel also sums the bias gradient)."""
  return dispatch.choose("activation", model_cfg, dtype, variant=name) != "xla"


def bias_activation(x_BxTxF: Array, bias_F: Array | None, name: str, model_cfg) -> Array:
  """ACTIVATIONS[name](x + bias), shaped like x, through the implementation `dispatch.choose` picks."""
  fn = dispatch.implementation("activation", model_cfg, x_BxTxF.dtype, variant=name).fn
  return fn(x_BxTxF.reshape(-1, x_BxTxF.shape[-1]), bias_F, name).reshape(x_BxTxF.shape)
