"""The Pallas attention kernels (TPU splash, GPU Triton flash) against the XLA path, in Pallas interpret mode on CPU.

Values and gradients with causal masks, packed segments and grouped-query
attention (tiny shapes: splash tiles are multiples of 128 rows), then the
kernels through the ops layer in a train step on 8 CPU devices (shard_map),
and splash compiled ahead of time for a TPU slice (Mosaic, no TPU needed).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm.models import layers
from jaxlm.ops import pallas_attention, xla_attention
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import step as train_step

B, T, N, K, H = 2, 256, 4, 2, 32  # GQA: two query heads per key/value head


def packed_segments() -> np.ndarray:
  """Row 0: documents of 100 and 120 tokens, then 36 padding; row 1: one document of 256 tokens."""
  row0 = np.concatenate([np.full(100, 1), np.full(120, 2), np.zeros(36)])
  return np.stack([row0, np.ones(T)]).astype(np.int32)


def qkv(seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(
    jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H))
  )


def loss_and_grads(attention, q, k, v, segments, cotangent):
  """sum(out * cotangent) over non-padding queries, and its gradients w.r.t. q, k and v."""
  real_BxTx1x1 = (segments != 0)[:, :, None, None]
  return jax.jit(
    jax.value_and_grad(lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent * real_BxTx1x1), argnums=(0, 1, 2))
  )(q, k, v)


def xla_reference(segments, causal):
  mask = layers.attention_mask(segments, segments, causal)
  return lambda q, k, v: xla_attention.dot_product_attention(q, k, v, mask, causal=causal)


def assert_matches(kernel, segments, causal):
  q, k, v = qkv()
  cotangent = jax.random.normal(jax.random.key(1), (B, T, N, H))
  expected_loss, expected_grads = loss_and_grads(xla_reference(segments, causal), q, k, v, segments, cotangent)
  loss, grads = loss_and_grads(kernel, q, k, v, segments, cotangent)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for name, got, want in zip("qkv", grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_splash_matches_xla(causal):
  segments = jnp.asarray(packed_segments())
  assert_matches(
    lambda q, k, v: pallas_attention.splash_attention(
      q, k, v, segments, segments, causal=causal, block_size=128, interpret=True
    ),
    segments,
    causal,
  )


def test_triton_matches_xla():
  segments = jnp.asarray(packed_segments())
  assert_matches(
    lambda q, k, v: pallas_attention.triton_attention(q, k, v, segments, causal=True, block_size=64, interpret=True),
    segments,
    True,
  )


def test_splash_block_size_must_fit_the_sequence():
  q, k, v = qkv()
  segments = jnp.asarray(packed_segments())
  with pytest.raises(config_lib.ConfigError, match="model.attention_block_size"):
    pallas_attention.splash_attention(
      q[:, :192],
      k[:, :192],
      v[:, :192],
      segments[:, :192],
      segments[:, :192],
      causal=True,
      block_size=128,
      interpret=True,
    )


def train_step_metrics(attention_impl: str) -> dict:
  """One train step of a tiny GQA model on 8 CPU devices (mesh data 4 x tensor 2) on packed rows."""
  config = tiny_config(num_kv_heads=2, attention_impl=attention_impl, position="rope")
  config.data.seq_len = config.model.max_len = 128
  config.mesh.tensor = 2
  s = train_step.setup(config, mesh_lib.make_mesh(config))
  state = train_step.create_state(s, seed=0)
  tokens = np.random.default_rng(0).integers(0, 256, (8, 129)).astype(np.int32)
  segments = np.where(np.arange(128) < 50, 1, 2)[None].repeat(8, 0).astype(np.int32)
  segments[:, 120:] = 0  # padding
  positions = np.where(segments == 2, np.arange(128) - 50, np.arange(128)).astype(np.int32)
  batch = sharding.global_batch(
    {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": segments,
      "positions": positions,
      "weights": (segments != 0).astype(np.float32),
    },
    s.batch_sharding,
  )
  _, metrics = train_step.make_train_step(s)(state, batch, jax.random.key(0))
  return {key: float(value) for key, value in metrics.items()}


@pytest.fixture(scope="module")
def xla_metrics():
  return train_step_metrics("xla")


@pytest.mark.slow
@pytest.mark.parametrize("attention_impl,kernel", [("splash", "splash_attention"), ("triton", "triton_attention")])
def test_through_the_ops_layer_on_a_mesh(attention_impl, kernel, xla_metrics, monkeypatch):
  """`model.attention_impl` picks the kernel; shard_map splits batch and heads; loss and gradients match XLA."""
  calls = []
  original = getattr(pallas_attention, kernel)
  monkeypatch.setattr(pallas_attention, kernel, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
  got = train_step_metrics(attention_impl)
  assert calls, f"{kernel} was not called"
  assert got["loss"] == pytest.approx(xla_metrics["loss"], rel=1e-5)
  assert got["grad_norm"] == pytest.approx(xla_metrics["grad_norm"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: pip install -e '.[test]'")
def test_splash_compiles_for_tpu_without_a_tpu(tmp_path):
  """Mosaic compiles the splash kernels for v5e on this CPU host: the train step carries TPU custom calls."""
  from jaxlm.training import aot

  config = tiny_config(attention_impl="splash", num_kv_heads=2, dtype="bfloat16")
  config.data.seq_len = config.model.max_len = 256
  config.model.attention_block_size = 128
  config.mesh.tensor = 2
  report = aot.compile_train_step(config, "v5e:2x2")
  assert report["fits"]
  assert report["tpu_custom_calls"] >= 3  # forward, and the dq and dkv kernels of the backward pass
