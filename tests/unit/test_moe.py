"""Mixture of experts on one device: the dispatch implementations against the dense reference (forward and
gradients), capacity drops, routing, the losses and their metrics, scan/remat/decode, config checks, FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm.inference import decode
from jaxlm.models import moe
from jaxlm.models import transformer as model_lib
from jaxlm.ops import moe as moe_ops
from jaxlm.training import flops
from jaxlm.training import step as train_step

G, S, D, E, F, K = 2, 8, 16, 4, 32, 2
MOE = dict(
  num_layers=1, d_model=16, num_heads=2, mlp="swiglu", use_bias=False, moe_experts=E, moe_top_k=K, moe_hidden=F
)


def routed(seed=0, top_k=K):
  """Tokens, top-k routing (renormalized) and expert weights of the op's shapes."""
  keys = jax.random.split(jax.random.key(seed), 5)
  x_GxSxD = jax.random.normal(keys[0], (G, S, D))
  probs_GxSxE = jax.nn.softmax(jax.random.normal(keys[1], (G, S, E)))
  top_GxSxK, index_GxSxK = jax.lax.top_k(probs_GxSxE, top_k)
  weights = [jax.random.normal(key, shape) * 0.2 for key, shape in zip(keys[2:], [(E, D, F), (E, D, F), (E, F, D)])]
  return x_GxSxD, index_GxSxK, top_GxSxK / top_GxSxK.sum(-1, keepdims=True), weights


def run(dispatch, x, index, combine, weights, capacity=S):
  return moe_ops.moe_ffn(x, index, combine, *weights, dispatch=dispatch, capacity=capacity)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dispatches_equal_the_dense_reference_forward_and_gradients(top_k):
  x, index, combine, weights = routed(top_k=top_k)
  cotangent = jax.random.normal(jax.random.key(9), x.shape)

  def objective(dispatch):
    loss = lambda x, combine, weights: jnp.sum(run(dispatch, x, index, combine, weights) * cotangent)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, combine, weights)

  reference, reference_grads = objective("dense")
  assert float(jnp.abs(reference_grads[0]).max()) > 0
  for dispatch in ("dropless", "capacity"):  # capacity S: no expert can overflow, so nothing drops
    value, grads = objective(dispatch)
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads)):
      np.testing.assert_allclose(got, want, atol=1e-5)


def test_capacity_drops_overflow_choices_in_switch_priority():
  x, index, combine, weights = routed()
  slots = moe_ops.capacity(S, K, E, 0.5)  # ceil(0.5 * 8 * 2 / 4) = 2 slots per expert and row
  assert slots == 2
  keep = moe_ops.capacity_keep(index, E, slots)
  assert 0 < float(keep.mean()) < 1
  # Every expert keeps at most `slots` choices per row, and first choices are kept before any second choice.
  chosen_GxSxKxE = np.asarray(jax.nn.one_hot(index, E, dtype=jnp.int32))
  kept_GxSxKxE = chosen_GxSxKxE * np.asarray(keep)[..., None]
  np.testing.assert_array_equal(kept_GxSxKxE.sum((1, 2)), np.minimum(slots, chosen_GxSxKxE.sum((1, 2))))
  np.testing.assert_array_equal(kept_GxSxKxE[:, :, 0].sum(1), np.minimum(slots, chosen_GxSxKxE[:, :, 0].sum(1)))
  # A dropped choice contributes nothing; the kept ones are the reference's.
  dropped = run("capacity", x, index, combine, weights, capacity=slots)
  np.testing.assert_allclose(dropped, run("dense", x, index, combine * keep, weights), atol=1e-5)


def test_a_sharded_slice_of_experts_adds_only_its_own_choices():
  """What each device computes under expert parallelism: its experts' share; the shares sum to the whole."""
  x, index, combine, weights = routed()
  for dispatch in moe_ops.REGISTRY:
    fn = moe_ops.REGISTRY[dispatch].fn
    halves = [
      fn(x, index, combine, *(w[first : first + 2] for w in weights), first_expert=first, num_experts=E, capacity=S)
      for first in (0, 2)
    ]
    np.testing.assert_allclose(halves[0] + halves[1], run("dense", x, index, combine, weights), atol=1e-5)


def build(**overrides):
  cfg = tiny_config(**{**MOE, **overrides}).model
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 24), 4, 260)
  model = model_lib.build(cfg)
  return cfg, model, jax.jit(model.init)(jax.random.key(0), tokens_BxT), tokens_BxT


def test_parameters_have_mixtrals_layout_and_logical_axes():
  cfg, _, variables, _ = build(num_layers=2, moe_shared_experts=1, moe_every=2)
  params = variables["params"]["decoder"]
  assert "mlp" in params["layer_0"] and "router" not in params["layer_0"]["mlp"]  # layer 0 stays dense
  mlp = params["layer_1"]["mlp"]
  assert mlp["router"]["kernel"].value.shape == (D, E) and mlp["router"]["kernel"].names == ("embed", None)
  for name, shape, names in [
    ("wi_gate", (E, D, F), ("expert", "embed", "mlp")),
    ("wi_up", (E, D, F), ("expert", "embed", "mlp")),
    ("wo", (E, F, D), ("expert", "mlp", "embed")),
  ]:
    assert mlp[name].value.shape == shape and mlp[name].names == names, name
  assert mlp["shared"]["gate"]["kernel"].value.shape == (D, F)  # one shared expert of width F


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_model_logits_equal_the_dense_dispatch(dispatch):
  cfg, model, variables, tokens = build()
  reference = jax.jit(model.apply)(variables, tokens)
  cfg.moe_dispatch, cfg.moe_capacity_factor = dispatch, float(E)  # capacity: room for every token
  got = jax.jit(model_lib.build(cfg).apply)(variables, tokens)
  np.testing.assert_allclose(got, reference, atol=1e-5)


def test_top_1_weighs_by_the_probability_so_the_router_learns():
  cfg, model, variables, tokens = build(moe_top_k=1, moe_aux_loss_weight=0.0, moe_z_loss_weight=0.0)
  batch = {**model_lib.example_batch(cfg, tokens.shape), "inputs": tokens, "targets": tokens}
  loss_fn = train_step.cross_entropy_loss(tiny_config().train)
  grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, batch, {})["loss_sum"]))(nn.meta.unbox(variables["params"]))
  assert float(jnp.abs(grads["decoder"]["layer_0"]["mlp"]["router"]["kernel"]).max()) > 0


def test_losses_are_sown_weighted_into_the_objective_and_reported():
  cfg, model, variables, tokens = build(scan_layers=True, remat_policy="full")
  params = nn.meta.unbox(variables["params"])
  batch = {**model_lib.example_batch(cfg, tokens.shape), "inputs": tokens, "targets": tokens}
  sums = jax.jit(lambda p: train_step.cross_entropy_loss(tiny_config().train)(model, p, batch, {}))(params)
  weight = float(sums["weight_sum"])
  # By hand from the scanned layers' sown values: mean over layers of E * sum_e f_e P_e, and of mean lse^2.
  _, state = jax.jit(lambda v: model.apply(v, tokens, mutable=["intermediates"]))(variables)
  layers = state["intermediates"]["decoder"]["layers"]["block"]["mlp"]
  assert layers["moe_aux"][0].shape == (cfg.num_layers,) and layers["moe_load"][0].shape == (cfg.num_layers, E)
  np.testing.assert_allclose(sums["moe_aux_sum"] / weight, layers["moe_aux"][0].mean(), rtol=1e-5)
  np.testing.assert_allclose(sums["router_z_sum"] / weight, layers["router_z"][0].mean(), rtol=1e-5)
  assert float(sums["moe_aux_sum"] / weight) >= 1.0 - 1e-5  # 1 only when perfectly balanced
  np.testing.assert_allclose(layers["moe_load"][0].sum(-1), 1.0, rtol=1e-6)
  penalty = cfg.moe_aux_loss_weight * sums["moe_aux_sum"] + cfg.moe_z_loss_weight * sums["router_z_sum"]
  np.testing.assert_allclose(sums["loss_sum"] - sums["nll_sum"], penalty, rtol=1e-4)
  assert float(sums["moe_dropped_sum"]) == 0.0 and sums["moe_load_max_sum"] >= weight >= sums["moe_load_min_sum"]


def test_capacity_reports_the_dropped_fraction():
  _, model, variables, tokens = build(moe_dispatch="capacity", moe_capacity_factor=0.5)
  statistics = jax.jit(lambda p: moe.apply_with_statistics(model, p, {"tokens_BxT": tokens}, {})[1])
  stats = statistics(nn.meta.unbox(variables["params"]))
  assert 0.0 < float(stats["moe_dropped"]) < 1.0


def test_cached_decoding_equals_the_full_forward():
  cfg, model, variables, tokens = build(position="rope")
  full_BxTxV = jax.jit(model.apply)(variables, tokens)
  adapter = decode.adapter_for(cfg)
  prefill, step = jax.jit(adapter.prefill, static_argnums=2), jax.jit(adapter.step)
  params = nn.meta.unbox(variables["params"])
  logits_BxPxV, _, state = prefill(params, {"tokens_BxP": tokens[:, :10], "lengths_B": jnp.array([10, 10])}, 32)
  np.testing.assert_allclose(logits_BxPxV, full_BxTxV[:, :10], atol=1e-5)
  for t in range(10, 14):
    logits_BxV, state = step(params, state, tokens[:, t])
    np.testing.assert_allclose(logits_BxV, full_BxTxV[:, t], atol=1e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(moe_top_k=5), "model.moe_top_k=5 exceeds model.moe_experts=4"),
    (dict(mlp="gelu"), "needs model.mlp='swiglu'"),
    (dict(moe_every=2, scan_layers=True), "set --config.model.scan_layers=False"),
    (dict(moe_dispatch="sparse"), "'model.moe_dispatch' is 'sparse'; choose one of dropless, capacity, dense"),
  ],
)
def test_bad_moe_configs_are_refused_in_one_line(overrides, message):
  config = tiny_config(**{**MOE, **overrides})
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(config, 8)


def test_experts_must_divide_over_the_expert_axis():
  config = tiny_config(**MOE)
  config.mesh.expert = 8
  with pytest.raises(config_lib.ConfigError, match="model.moe_experts=4 is not divisible by mesh.expert=8"):
    config_lib.validate(config, 8)


def test_flops_count_the_active_experts():
  dense = tiny_config(**{**MOE, "moe_experts": 0, "mlp_dim": F}).model
  top2, top1 = tiny_config(**MOE).model, tiny_config(**{**MOE, "moe_top_k": 1}).model
  router = dense.num_layers * D * E
  assert flops.matmul_params(top2) == flops.matmul_params(dense) + dense.num_layers * 3 * D * F + router
  assert flops.matmul_params(top1) == flops.matmul_params(dense) + router
  assert flops.inactive_params(top2) == dense.num_layers * (E - K) * 3 * D * F and flops.inactive_params(dense) == 0
