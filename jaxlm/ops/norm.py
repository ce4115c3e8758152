"""The norm op: LayerNorm or RMSNorm over the last axis, statistics in float32.

Implementations take (x_MxD float32, scale_D, bias_D or None, rms, eps) and
return y_MxD float32: "xla" (jnp) and "cpu" (the fused float32 kernel of
`cpu_kernels`, chosen automatically on one CPU device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops import cpu_kernels, dispatch

Array = jax.Array


def _xla(x_MxD: Array, scale_D: Array, bias_D: Array | None, rms: bool, eps: float) -> Array:
  if not rms:
    x_MxD = x_MxD - jnp.mean(x_MxD, axis=-1, keepdims=True)
  y_MxD = x_MxD * jax.lax.rsqrt(jnp.mean(x_MxD * x_MxD, axis=-1, keepdims=True) + eps) * scale_D.astype(jnp.float32)
  return y_MxD if bias_D is None else y_MxD + bias_D.astype(jnp.float32)


def _cpu(x_MxD: Array, scale_D: Array, bias_D: Array | None, rms: bool, eps: float) -> Array:
  return cpu_kernels.norm(x_MxD, scale_D, jnp.zeros_like(scale_D) if bias_D is None else bias_D, rms, eps)


dispatch.register("norm", "xla", dispatch.Implementation(_xla))
dispatch.register(
  "norm",
  "cpu",
  dispatch.Implementation(_cpu, **cpu_kernels.WHERE_THEY_RUN, available=cpu_kernels.available),
)


def norm(x_BxTxD: Array, scale_D: Array, bias_D: Array | None, model_cfg) -> Array:
  """`model_cfg.norm` (layernorm | rmsnorm) of x with `model_cfg.norm_eps`, in float32, shaped like x."""
  x_MxD = x_BxTxD.astype(jnp.float32).reshape(-1, x_BxTxD.shape[-1])
  # The kernel's operands must all be float32; a bfloat16 scale keeps the norm on XLA's code.
  dtype = jnp.float32 if scale_D.dtype == jnp.float32 else scale_D.dtype
  fn = dispatch.implementation("norm", model_cfg, dtype).fn
  return fn(x_MxD, scale_D, bias_D, model_cfg.norm == "rmsnorm", model_cfg.norm_eps).reshape(x_BxTxD.shape)
