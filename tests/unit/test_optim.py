"""Optimizer: the weight-decay mask by parameter path, and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.models import transformer as model_lib
from jaxlm.training import optim


def param_paths(cfg):
  params = jax.eval_shape(lambda: model_lib.build(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
  import flax.linen as nn

  return nn.meta.unbox(params["params"])


def decayed_paths(cfg, decay_embeddings):
  mask = optim.decay_mask(param_paths(cfg), decay_embeddings)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {"/".join(str(k.key) for k in path) for path, decays in flat if decays}


def test_decay_mask_hits_exactly_the_matrices():
  cfg = tiny_config(tie_embeddings=False).model
  expected = {
    f"decoder/layer_{i}/{name}/kernel"
    for i in range(2)
    for name in (
      "self_attention/query",
      "self_attention/key",
      "self_attention/value",
      "self_attention/out",
      "mlp/up",
      "mlp/down",
    )
  }
  expected.add("embedder/unembed/kernel")
  assert decayed_paths(cfg, decay_embeddings=False) == expected
  with_embeddings = expected | {"embedder/token/embedding", "embedder/position/embedding"}
  assert decayed_paths(cfg, decay_embeddings=True) == with_embeddings


def test_decay_mask_on_swiglu_rmsnorm():
  cfg = tiny_config(mlp="swiglu", norm="rmsnorm", use_bias=False).model
  paths = decayed_paths(cfg, False)
  assert "decoder/layer_0/mlp/gate/kernel" in paths
  assert not any("norm" in p or "bias" in p or "embedding" in p for p in paths)


def test_adamw_does_not_decay_norms():
  cfg = tiny_config()
  params = param_paths(cfg.model)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  tx, _ = optim.build(cfg.optim, 100, cfg.model.d_model)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(zero_grads, state, params)
  assert float(jnp.abs(updates["decoder"]["layer_0"]["mlp_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(updates["decoder"]["layer_0"]["mlp"]["up"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("name", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_warm_up_to_the_peak(name):
  cfg = tiny_config().optim
  cfg.schedule, cfg.warmup_steps, cfg.learning_rate = name, 10, 1e-3
  lr = optim.schedule(cfg, 100, 32)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  assert float(lr(99)) <= 1e-3 * (1 + 1e-6)


def test_transformer_schedule_is_the_papers():
  cfg = tiny_config().optim
  cfg.schedule, cfg.warmup_steps, cfg.learning_rate = "transformer", 4000, 1.0
  lr = optim.schedule(cfg, 100000, 512)
  for step in (1, 100, 4000, 20000):  # the paper counts steps from 1
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    np.testing.assert_allclose(float(lr(step - 1)), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["adafactor", "lion"])
def test_other_optimizers_step(name):
  cfg = tiny_config()
  cfg.optim.name = name
  params = {"w": jnp.ones((4, 4)), "scale": jnp.ones(4)}
  tx, _ = optim.build(cfg.optim, 10, 4)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
