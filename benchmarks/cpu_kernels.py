"""Each CPU kernel of `jaxlm.ops.cpu_kernels` against the XLA code it replaces, forward + backward.

    python benchmarks/cpu_kernels.py [--rounds 7] [--repeats 5]

Shapes are one layer of the reference config (batch 16 x seq 256, d_model
384, 6 heads, MLP 1536). Both sides are jitted value-and-grad functions with
the same inputs; rounds alternate which side goes first, and the table gives
median milliseconds per call and the speed-up (XLA time / kernel time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlm import runtime
from jaxlm.models import layers
from jaxlm.ops import cpu_kernels
from jaxlm.ops import xla_attention as attention

B, T, N, H, D, F = 16, 256, 6, 64, 384, 1536


def cases(rng):
  """name -> (kernel function, XLA function, inputs); each function returns a scalar to differentiate."""
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  seg = jnp.ones((B, T), jnp.int32)
  mask = layers.attention_mask(seg, seg, causal=True)
  qkv, out_ct = normal(B, T, 3 * N, H), normal(B, T, N, H)
  x_d, x_f, w, bias_f, ct_f = normal(B * T, D), normal(B * T, F), normal(D, F) * 0.05, normal(F), normal(B * T, F)
  scale, bias_d, ct_d = normal(D), normal(D), normal(B * T, D)

  def xla_attention(qkv):
    q, k, v = qkv[:, :, :N], qkv[:, :, N : 2 * N], qkv[:, :, 2 * N :]
    return jnp.sum(attention.dot_product_attention(q, k, v, mask, causal=True) * out_ct)

  def xla_norm(x, scale, bias):
    mean = jnp.mean(x, -1, keepdims=True)
    centered = x - mean
    y = centered * jax.lax.rsqrt(jnp.mean(centered * centered, -1, keepdims=True) + 1e-5) * scale + bias
    return jnp.sum(y * ct_d)

  return {
    "attention (causal, fused qkv)": (
      lambda qkv: jnp.sum(cpu_kernels.self_attention(qkv, mask[:, 0], True, N) * out_ct),
      xla_attention,
      (qkv,),
    ),
    "LayerNorm": (
      lambda x, s, b: jnp.sum(cpu_kernels.norm(x, s, b, False, 1e-5) * ct_d),
      xla_norm,
      (x_d, scale, bias_d),
    ),
    "bias + GELU (tanh)": (
      lambda x, b: jnp.sum(cpu_kernels.bias_gelu(x, b) * ct_f),
      lambda x, b: jnp.sum(jax.nn.gelu(x + b, approximate=True) * ct_f),
      (x_f, bias_f),
    ),
    "dense 4096x384 @ 384x1536": (
      lambda x, w, b: jnp.sum(cpu_kernels.dense(x, w, b) * ct_f),
      lambda x, w, b: jnp.sum((x @ w + b) * ct_f),
      (x_d, w, bias_f),
    ),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--repeats", type=int, default=5, help="calls per timing")
  args = p.parse_args(argv)
  runtime.retain_freed_memory()
  if not (cpu_kernels.available() and cpu_kernels.blas()):
    raise SystemExit("the CPU kernels are not built here (see the warning above)")
  compiled = {}
  for name, (kernel, xla, inputs) in cases(np.random.default_rng(0)).items():
    argnums = tuple(range(len(inputs)))
    for side, fn in (("kernel", kernel), ("xla", xla)):
      step = jax.jit(jax.value_and_grad(fn, argnums=argnums))
      jax.block_until_ready(step(*inputs))
      compiled[name, side] = (step, inputs)
  times = {key: [] for key in compiled}
  for r in range(args.rounds):
    for key in list(compiled) if r % 2 == 0 else list(compiled)[::-1]:
      step, inputs = compiled[key]
      start = time.perf_counter()
      for _ in range(args.repeats):
        jax.block_until_ready(step(*inputs))
      times[key].append((time.perf_counter() - start) / args.repeats * 1e3)
  print(
    f"one reference layer, forward + backward, {jax.device_count()} CPU device(s), "
    f"medians of {args.rounds} rounds x {args.repeats} calls"
  )
  print(f"  {'':32s} {'kernel ms':>10s} {'XLA ms':>8s} {'speed-up':>9s}")
  for name in dict.fromkeys(name for name, _ in compiled):
    k, x = statistics.median(times[name, "kernel"]), statistics.median(times[name, "xla"])
    print(f"  {name:32s} {k:10.2f} {x:8.2f} {x / k:8.2f}x")


if __name__ == "__main__":
  main()
