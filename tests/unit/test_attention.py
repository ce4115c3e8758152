"""The attention op's CPU implementations against jax.nn.dot_product_attention.

"kernel" is the fused kernel of `cpu_kernels` (the "cpu" entry of the
attention registry, chosen on one CPU device), "xla" the XLA code with its
causal block shortcut (`jaxlm.ops.xla_attention`). Every test here runs on both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ops
from jaxlm.models import layers
from jaxlm.ops import cpu_kernels, xla_attention


@pytest.fixture(params=["kernel", "xla"])
def path(request):
  if request.param == "kernel" and not cpu_kernels.available():
    pytest.skip("no C++ compiler: the CPU kernels are not built")
  return request.param


@pytest.fixture
def attention(path):
  fn = ops.REGISTRY["attention"]["cpu" if path == "kernel" else "xla"].fn
  return lambda q, k, v, mask, causal=False: fn(
    q, k, v, mask_Bx1xTxS=mask, q_segment_ids_BxT=None, kv_segment_ids_BxS=None, causal=causal, model_cfg=None
  )


def _inputs(seed, b, t, s, n, k, h):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  kk = jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32)
  return q, kk, v, rng


def _packed_segments(rng, b, t):
  """Random packed documents (ids 1, 2, ...) with trailing padding (0); row 0 is all padding after t//2."""
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    pos, doc = 0, 1
    end = t - rng.integers(0, t // 4)
    while pos < end:
      length = int(rng.integers(1, t // 2))
      seg[i, pos : min(pos + length, end)] = doc
      pos, doc = pos + length, doc + 1
  seg[0, t // 2 :] = 0
  return jnp.asarray(seg)


@pytest.mark.parametrize("t,n,k", [(256, 6, 6), (256, 4, 2), (128, 4, 1), (96, 2, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_dot_product_attention_matches_jax(t, n, k, causal, path, attention):
  b, h = 3, 16
  q, kk, v, rng = _inputs(t + n + k, b, t, t, n, k, h)
  seg = _packed_segments(rng, b, t)
  mask = layers.attention_mask(seg, seg, causal=causal)
  assert not bool(jnp.any(mask[0, 0, -1]))  # a fully masked (padding) row is covered
  assert bool(jnp.any(mask[0, 0, 0]))
  # On the XLA path with causal=True a query that sees no key (padding) averages only the values
  # up to its block's end, so those rows are left out, as the loss leaves them out in training.
  # The kernel matches jax.nn on them too.
  sees_a_key = jnp.any(mask[:, 0], axis=-1)[:, :, None, None] if causal and path == "xla" else True
  ct = jnp.where(sees_a_key, jnp.asarray(rng.standard_normal(q.shape), jnp.float32), 0.0)

  def loss(f, *args):
    return jnp.sum(f(*args) * ct)

  ours = lambda q, kk, v: attention(q, kk, v, mask, causal=causal)
  ref = lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(
    jnp.where(sees_a_key, jax.jit(ours)(q, kk, v), 0.0),
    jnp.where(sees_a_key, jax.jit(ref)(q, kk, v), 0.0),
    rtol=1e-5,
    atol=1e-5,
  )
  g_ours = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, kk, v)
  g_ref = jax.jit(jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, kk, v)
  for a, r in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_dot_product_attention_arbitrary_mask(attention):
  """A random mask (not causal, so a block-causal shortcut would be wrong) gives jax's result."""
  b, t, n, h = 2, 256, 2, 8
  q, kk, v, rng = _inputs(0, b, t, t, n, n, h)
  mask = jnp.asarray(rng.random((b, 1, t, t)) < 0.5)
  np.testing.assert_allclose(
    attention(q, kk, v, mask), jax.nn.dot_product_attention(q, kk, v, mask=mask), rtol=1e-5, atol=1e-5
  )


def test_causal_path_skips_keys_after_each_block(attention):
  """The causal path really skips work: it never reads keys after a query block's end.

  Blocks are 64 queries on both paths here (the kernel's tile, and T / 4 on
  the XLA path). Poisoning the last key with NaN leaves every earlier block's
  output finite; the full path (causal=False) multiplies 0 by NaN there and
  returns NaN.
  """
  b, t, n, h = 1, 256, 2, 8
  q, kk, v, _ = _inputs(1, b, t, t, n, n, h)
  seg = jnp.ones((b, t), jnp.int32)
  mask = layers.attention_mask(seg, seg, causal=True)
  v = v.at[:, -1].set(jnp.nan)
  block = t // xla_attention._CAUSAL_BLOCKS
  attend = jax.jit(attention, static_argnames="causal")
  assert bool(jnp.all(jnp.isfinite(attend(q, kk, v, mask, causal=True)[:, : t - block])))
  assert not bool(jnp.all(jnp.isfinite(attend(q, kk, v, mask, causal=False)[:, : t - block])))
