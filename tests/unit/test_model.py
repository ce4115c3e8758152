"""The decoder-only model: causality, packing, attention variants, scan equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.models import layers
from jaxlm.models import transformer as model_lib

STYLES = {
  "gpt2": {},
  "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False, num_kv_heads=2),
  "mqa": dict(num_kv_heads=1, position="rope"),
  "parallel": dict(parallel_residual=True, position="rope", use_bias=False, tie_embeddings=False),  # GPT-J
  "squared_relu": dict(mlp="squared_relu"),
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
  assert np.all(per_position[position + 1 :] == 0)
  assert np.all(per_position[: position + 1] > 0)


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
  np.testing.assert_allclose(
    jax.jit(module.apply)(variables, tokens), jax.jit(module_scan.apply)({"params": scan_params}, tokens), atol=1e-5
  )


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


def test_parallel_block_is_one_norm_feeding_attention_and_mlp():
  """x + attention(norm(x)) + mlp(norm(x)), recomputed from the block's own parameters."""
  cfg = tiny_config(**STYLES["parallel"]).model
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model))
  segments = jnp.ones((2, 8), jnp.int32)
  mask = layers.attention_mask(segments, segments, causal=True)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  block = layers.ParallelBlock(cfg, causal=True)
  params = jax.jit(block.init)(jax.random.key(1), x, mask, positions)["params"]
  assert sorted(params) == ["mlp", "norm", "self_attention"]
  h = layers.Norm(cfg).apply({"params": params["norm"]}, x)
  expected = (
    x
    + layers.Attention(cfg, causal=True).apply({"params": params["self_attention"]}, h, mask, positions)
    + layers.Mlp(cfg).apply({"params": params["mlp"]}, h)
  )
  np.testing.assert_allclose(jax.jit(block.apply)({"params": params}, x, mask, positions), expected, atol=1e-5)


def test_squared_relu_mlp():
  cfg = tiny_config(mlp="squared_relu").model
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model))
  params = nn.meta.unbox(layers.Mlp(cfg).init(jax.random.key(1), x)["params"])
  params["up"]["bias"] = params["up"]["bias"] + 0.1  # so the bias's place (inside the square) matters
  up = x @ params["up"]["kernel"] + params["up"]["bias"]
  expected = np.maximum(up, 0) ** 2 @ params["down"]["kernel"] + params["down"]["bias"]
  np.testing.assert_allclose(layers.Mlp(cfg).apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_a_block_class_passed_in_keeps_scan_remat_and_the_cache():
  """DecoderLM(block_cls=...) with a block the config does not name: the scanned, rematerialized stack equals
  the unrolled one, and cached decoding one token at a time gives the full forward pass's logits."""
  cfg = tiny_config(position="rope").model
  tokens = jnp.asarray(np.random.default_rng(3).integers(4, 260, (1, 10)))
  model = model_lib.DecoderLM(cfg, block_cls=layers.ParallelBlock)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  assert "norm" in variables["params"]["decoder"]["layer_0"]  # the parallel block's single norm
  full = jax.jit(model.apply)(variables, tokens)

  scanned = model_lib.DecoderLM(
    tiny_config(position="rope", scan_layers=True, remat_policy="full").model, block_cls=layers.ParallelBlock
  )
  params = nn.meta.unbox(variables["params"])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params["decoder"][f"layer_{i}"] for i in range(2)])
  np.testing.assert_allclose(
    jax.jit(scanned.apply)({"params": {**params, "decoder": {"layers": {"block": stacked}}}}, tokens), full, atol=1e-5
  )

  decoder = model_lib.DecoderLM(cfg, decode=True, block_cls=layers.ParallelBlock)
  cache = decoder.init(jax.random.key(0), tokens)["cache"]
  step = jax.jit(
    lambda cache, token, t: decoder.apply(
      {"params": params, "cache": cache},
      token,
      jnp.ones((1, 1), jnp.int32),
      t[None, None],
      t[None, None],
      (jnp.arange(10) <= t)[None].astype(jnp.int32),
      mutable=["cache"],
    )
  )
  for t in range(10):
    logits, mutated = step(cache, tokens[:, t : t + 1], jnp.asarray(t))
    cache = mutated["cache"]
    np.testing.assert_allclose(logits[0, 0], full[0, t], atol=1e-4)
