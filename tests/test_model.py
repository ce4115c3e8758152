"""The decoder-only model: causality, packing, attention variants, scan equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import layers, model as model_lib

from conftest import tiny_config

STYLES = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False,
                  num_kv_heads=2),
    "mqa": dict(num_kv_heads=1, position="rope"),
}


def init(cfg, tokens):
  module = model_lib.build(cfg)
  # jit: tracing once takes seconds where op-by-op dispatch took tens of seconds per test.
  return module, jax.jit(module.init)(jax.random.key(0), tokens)


def logits_with_embedding_delta(module, variables, tokens, delta_BxTxD):
  """Logits with `delta_BxTxD` added to the embedder's output, to differentiate through."""
  def add_delta(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Embedder) and context.method_name == "embed":
      out = out + delta_BxTxD.astype(out.dtype)
    return out
  with nn.intercept_methods(add_delta):
    return module.apply(variables, tokens)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_causal_through_gradients(style):
  cfg = tiny_config(**STYLES[style]).model
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 4, 260)
  module, variables = init(cfg, tokens)
  position = 9
  loss = lambda delta: logits_with_embedding_delta(module, variables, tokens, delta)[0, position].sum()
  grads_BxTxD = jax.jit(jax.grad(loss))(jnp.zeros((1, 16, cfg.d_model)))
  per_position = np.abs(np.asarray(grads_BxTxD)).sum(axis=(0, 2))
  assert np.all(per_position[position + 1:] == 0)
  assert np.all(per_position[:position + 1] > 0)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_packed_equals_unpacked(style):
  """Per-segment log-probs of two packed documents equal those of each document alone."""
  cfg = tiny_config(**STYLES[style]).model
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(4, 260, 11), rng.integers(4, 260, 7)
  packed = np.concatenate([doc_a, doc_b, np.zeros(6, int)])[None]  # 6 padding tokens
  segments = np.array([[1] * 11 + [2] * 7 + [0] * 6])
  positions = np.array([list(range(11)) + list(range(7)) + [0] * 6])
  module, variables = init(cfg, jnp.asarray(packed))
  apply = jax.jit(module.apply)
  logits_packed = apply(variables, jnp.asarray(packed), jnp.asarray(segments), jnp.asarray(positions))
  logits_a = apply(variables, jnp.asarray(doc_a[None]))
  logits_b = apply(variables, jnp.asarray(doc_b[None]))
  np.testing.assert_allclose(logits_packed[0, :11], logits_a[0], atol=1e-5)
  np.testing.assert_allclose(logits_packed[0, 11:18], logits_b[0], atol=1e-5)


def test_padding_is_never_attended():
  cfg = tiny_config().model
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, 260, (1, 12)))
  segments = jnp.asarray([[1] * 8 + [0] * 4])
  module, variables = init(cfg, tokens)
  apply = jax.jit(module.apply)
  base = apply(variables, tokens, segments)
  changed = apply(variables, tokens.at[0, 9].set(5), segments)
  np.testing.assert_array_equal(base[0, :8], changed[0, :8])


def test_scan_matches_unrolled():
  cfg = tiny_config().model
  tokens = jnp.asarray(np.random.default_rng(2).integers(4, 260, (2, 16)))
  module, variables = init(cfg, tokens)
  cfg_scan = tiny_config(scan_layers=True, remat_policy="full").model
  module_scan = model_lib.build(cfg_scan)
  params = nn.meta.unbox(variables["params"])
  layers_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params["decoder"][f"layer_{i}"] for i in range(2)])
  scan_params = {**params, "decoder": {"layers": {"block": layers_stacked}}}
  np.testing.assert_allclose(jax.jit(module.apply)(variables, tokens),
                             jax.jit(module_scan.apply)({"params": scan_params}, tokens), atol=1e-5)


def test_rope_is_half_split():
  """RoPE rotates pairs (i, i + H/2), as Hugging Face's `rotate_half` does."""
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 1, 1, 8) + 1
  out = layers.rope(x, jnp.array([[3]]), theta=10000.0)
  half = 4
  angle = 3 * (1.0 / 10000.0 ** (np.arange(half) / half))
  x1, x2 = np.arange(1, 5), np.arange(5, 9)
  expected = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)])
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5)


def test_every_parameter_has_logical_axes():
  for style in STYLES:
    cfg = tiny_config(**STYLES[style]).model
    boxed = jax.eval_shape(lambda: model_lib.build(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny_config(dtype="bfloat16").model
  tokens = jnp.ones((1, 8), jnp.int32)
  module, variables = init(cfg, tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert jax.jit(module.apply)(variables, tokens).dtype == jnp.bfloat16
