"""The additive attention bias through `ops.attention`: values and gradients (the bias's too) against
jax.nn.dot_product_attention, the CPU kernels standing aside, and a one-line refusal from the kernels that take
none. Also: a registered implementation is a config choice like a built-in one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm import ops
from jaxlm.models import layers
from jaxlm.models import transformer as model_lib
from jaxlm.ops import attention as attention_lib
from jaxlm.ops import dispatch

TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 260, (2, 12)))


def _inputs(b, t, n, k, bias_shape, seed=0):
  rng = np.random.default_rng(seed)
  q, kk, v = (jnp.asarray(rng.standard_normal((b, t, heads, 8)), jnp.float32) for heads in (n, k, k))
  return q, kk, v, jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)


@pytest.mark.parametrize(
  "b, t, n, k, bias_shape, causal",
  [
    (2, 16, 4, 2, (2, 4, 16, 16), True),  # GQA, per-row and per-head bias, causal blocks
    (2, 16, 4, 4, (1, 4, 16, 16), False),  # one bias for every row (ALiBi's shape without packing)
    (2, 12, 4, 1, (2, 1, 12, 12), True),  # multi-query, one bias for every head
  ],
)
def test_the_bias_matches_jax_values_and_gradients(b, t, n, k, bias_shape, causal):
  q, kk, v, bias = _inputs(b, t, n, k, bias_shape)
  segments = jnp.ones((b, t), jnp.int32).at[0, -3:].set(0)  # padding in row 0
  mask = layers.segment_mask(segments, segments, causal)
  real = (segments != 0)[:, :, None, None]  # padding rows are unspecified (the contract)
  cfg = tiny_config(cpu_kernels=False).model

  def ours(q, kk, v, bias):
    out = attention_lib.attention(q, kk, v, mask, cfg, causal=causal, bias_BxNxTxS=bias)
    return jnp.sum(jnp.where(real, jnp.sin(out), 0.0))

  def reference(q, kk, v, bias):
    out = jax.nn.dot_product_attention(q, kk, v, bias=bias, mask=mask.dense_Bx1xTxS)
    return jnp.sum(jnp.where(real, jnp.sin(out), 0.0))

  value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(q, kk, v, bias)
  expected, expected_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(q, kk, v, bias)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)
  assert float(jnp.abs(grads[3]).max()) > 0  # the bias gets a gradient


def test_the_cpu_kernels_stand_aside_for_a_bias():
  """On one CPU device the fused kernel (no bias) is the automatic choice; with a bias XLA's code runs."""
  q, kk, v, bias = _inputs(1, 8, 2, 2, (1, 2, 8, 8))
  mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
  cfg = tiny_config().model
  out = attention_lib.attention(q, kk, v, mask, cfg, causal=True, bias_BxNxTxS=bias)
  np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, kk, v, bias=bias, mask=mask), atol=1e-5)


@pytest.mark.parametrize("name", ["splash", "triton", "no_bias"])
def test_an_implementation_without_a_bias_refuses_it_in_one_line(name):
  ops.register_attention("no_bias", dispatch.REGISTRY["attention"]["xla"].fn)
  try:
    q, kk, v, bias = _inputs(1, 8, 2, 2, (1, 2, 8, 8))
    segments = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(config_lib.ConfigError, match=f"^model.attention_impl='{name}' takes no attention bias") as e:
      attention_lib.attention(
        q,
        kk,
        v,
        layers.segment_mask(segments, segments, True),
        tiny_config(attention_impl=name).model,
        causal=True,
        bias_BxNxTxS=bias,
      )
    assert "\n" not in str(e.value) and "xla" in str(e.value).split("one of ")[1]
  finally:
    dispatch.REGISTRY["attention"].pop("no_bias")


def test_a_registered_implementation_is_a_config_choice_and_gets_the_bias():
  """`register_attention('alibi_kernel', ..., takes_bias=True)`, then `model.attention_impl='alibi_kernel'`:
  accepted by the config's checks and called with ALiBi's bias."""
  seen = []

  def kernel(q, k, v, *, bias_BxNxTxS=None, **kwargs):
    seen.append(bias_BxNxTxS.shape)
    return dispatch.REGISTRY["attention"]["xla"].fn(q, k, v, bias_BxNxTxS=bias_BxNxTxS, **kwargs)

  ops.register_attention("alibi_kernel", kernel, takes_bias=True)
  try:
    config = tiny_config(attention_impl="alibi_kernel", position="alibi")
    assert "alibi_kernel" in config_lib.allowed("model.attention_impl").choices
    config_lib.validate(config, jax.device_count())
    model = model_lib.build(config.model)
    params = model.init(jax.random.key(0), TOKENS)["params"]
    reference = model_lib.build(tiny_config(position="alibi").model).apply({"params": params}, TOKENS)
    np.testing.assert_allclose(model.apply({"params": params}, TOKENS), reference, atol=1e-5)
    assert seen[-1] == (2, 4, 12, 12)
  finally:
    dispatch.REGISTRY["attention"].pop("alibi_kernel")
