"""Expert parallelism on 8 CPU devices: data x fsdp x expert x tensor meshes train exactly as one device does, with
the experts split over the expert axis and the tokens exchanged by all-gather and reduce-scatter."""

import re

import jax
import numpy as np
import pytest
from support import tiny_config

from jaxlm.parallel import mesh as mesh_lib
from jaxlm.training import step as train_step

EXPERTS = 8
MOE = dict(
  num_layers=1, d_model=16, num_heads=2, mlp="swiglu", use_bias=False, moe_experts=EXPERTS, moe_top_k=2, moe_hidden=16
)


def moe_config(data=1, fsdp=1, expert=1, tensor=1, **overrides):
  config = tiny_config(**{**MOE, **overrides})
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = data, fsdp, expert, tensor
  return config


def one_step(config, devices):
  """One train step of `config` on `devices` from seed 0 on a fixed batch: (setup, metrics, new params, HLO)."""
  s = train_step.setup(config, mesh_lib.make_mesh(config, devices))
  state = train_step.create_state(s, 0)
  batch = train_step.example_batch(config, config.train.global_batch_size)
  tokens = jax.random.randint(jax.random.key(1), batch["inputs"].shape, 4, 260)
  batch = jax.device_put({**batch, "inputs": tokens, "targets": tokens}, s.batch_sharding)
  step = train_step.compile_train_step(s)
  new_state, metrics = step(state, batch, jax.random.key(2))
  return s, jax.device_get(metrics), jax.device_get(new_state.params), step.compiled.as_text()


@pytest.fixture(scope="module")
def reference():
  return one_step(moe_config(), jax.devices()[:1])


@pytest.mark.parametrize(
  "data, fsdp, expert, tensor",
  [(2, 1, 2, 2)]
  + [pytest.param(*sizes, marks=pytest.mark.slow) for sizes in [(1, 1, 8, 1), (4, 1, 2, 1), (2, 2, 2, 1)]],
)
def test_expert_parallel_layouts_train_as_one_device(reference, data, fsdp, expert, tensor):
  s, metrics, params, hlo = one_step(moe_config(data, fsdp, expert, tensor), jax.devices())
  _, want_metrics, want_params, _ = reference
  for key in ("loss", "objective", "grad_norm"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # Parameters: experts split over expert, their model width over fsdp and hidden width over tensor.
  mlp = s.state_shardings.params["decoder"]["layer_0"]["mlp"]
  assert mlp["wi_gate"].shard_shape((EXPERTS, 16, 16)) == (EXPERTS // expert, 16 // fsdp, 16 // tensor)
  assert mlp["wo"].shard_shape((EXPERTS, 16, 16)) == (EXPERTS // expert, 16 // tensor, 16 // fsdp)
  assert mlp["router"]["kernel"].shard_shape((16, EXPERTS)) == (16 // fsdp, EXPERTS)
  # Activations: the batch rows split over data x fsdp x expert, gathered over expert inside the MoE layer and
  # scattered back (the collectives shard_map's all_gather and psum_scatter compile to).
  assert s.batch_sharding.shard_shape((8, 32)) == (8 // (data * fsdp * expert), 32)
  for collective in ("all_gather", "reduce_scatter"):  # (fsdp's weight gathers are XLA's, not these)
    instruction = collective.replace("_", "-") + "("
    lines = [line for line in hlo.splitlines() if f"/mlp/shard_map/{collective}" in line and instruction in line]
    assert lines, f"no {collective} in the MoE layers"
    for line in lines:  # each among the `expert` devices that hold one row block's experts
      assert len(re.search(r"replica_groups=\{\{([\d,]+)\}", line).group(1).split(",")) == expert, line
  # The router's softmax and top-k run on each device's own rows: nothing gathers its probabilities (the
  # gathers left are fsdp's, of the router's and the experts' weights).
  routing = [line for line in hlo.splitlines() if "all-gather(" in line and "/mlp/" in line]
  assert not [line for line in routing if "shard_map" not in line and "/mlp/router/" not in line]
