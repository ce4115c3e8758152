"""jaxlm.ops: kernel choice follows the target devices, dtype and config; shardings on a CPU mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, Mesh, NamedSharding, PartitionSpec
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm import ops
from jaxlm.models import layers
from jaxlm.models import transformer as model_lib
from jaxlm.ops import cpu_kernels, dispatch

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: the CPU kernels are not built")
OPS = ("attention", "norm", "dense", "activation")


@needs_kernels
def test_choice_follows_target_dtype_and_config():
  cfg = tiny_config().model
  one_cpu, eight_cpus, tpu = ops.Target("cpu", 1), ops.Target("cpu", 8), ops.Target("tpu", 4)
  for op in OPS:
    expected = "cpu" if op != "dense" or cpu_kernels.blas() else "xla"
    assert ops.choose(op, cfg, jnp.float32, variant="gelu", target=one_cpu) == expected
    assert ops.choose(op, cfg, jnp.float32, variant="gelu", target=eight_cpus) == "xla"  # not partitioned
    assert ops.choose(op, cfg, jnp.float32, variant="gelu", target=tpu) == "xla"
    assert ops.choose(op, cfg, jnp.bfloat16, variant="gelu", target=one_cpu) == "xla"
  assert ops.choose("activation", cfg, jnp.float32, variant="squared_relu", target=one_cpu) == "xla"
  assert ops.choose("norm", tiny_config(cpu_kernels=False).model, jnp.float32, target=one_cpu) == "xla"


def test_target_is_the_mesh_not_the_default_backend():
  assert ops.current_target() == ops.Target(jax.default_backend(), 1)  # no mesh set
  with jax.set_mesh(Mesh(np.array(jax.devices()), ("data",))):
    assert ops.current_target() == ops.Target("cpu", 8)
  with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))):
    assert ops.current_target() == ops.Target("cpu", 1)


def test_a_tpu_mesh_traced_on_a_cpu_host_gets_no_cpu_kernels():
  """Tracing for TPU devices from this CPU process (as AOT compilation does) emits no CPU custom call;
  choosing by the default backend did, and the TPU compile then failed ("Custom emitter ... not found")."""
  cfg = tiny_config().model
  module = model_lib.build(cfg)
  tokens = jnp.ones((4, 8), jnp.int32)
  params = jax.eval_shape(module.init, jax.random.key(0), tokens)
  tpu = AbstractMesh(
    (4,), ("data",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
  )
  with jax.sharding.use_abstract_mesh(tpu):
    assert ops.current_target() == ops.Target("tpu", 4)
    jaxpr = str(jax.make_jaxpr(module.apply)(params, tokens))
  assert "jaxlm_" not in jaxpr
  if cpu_kernels.available():  # and the same trace for one CPU device does use them
    assert "jaxlm_" in str(jax.make_jaxpr(module.apply)(params, tokens))


def test_named_implementation_must_run_on_the_target():
  cfg = tiny_config(attention_impl="cudnn").model
  with pytest.raises(ValueError, match="model.attention_impl='cudnn' runs on gpu"):
    ops.choose("attention", cfg, jnp.bfloat16, target=ops.Target("cpu", 1))
  assert ops.choose("attention", cfg, jnp.bfloat16, target=ops.Target("gpu", 8)) == "cudnn"


def test_a_registered_attention_is_called_with_the_documented_arguments(monkeypatch):
  """The extension point: a registered implementation named by model.attention_impl runs inside the model
  and sees segment ids for a packed batch; without them (decoding) 'xla' runs instead."""
  calls = []

  def recording(q, k, v, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
    calls.append((q_segment_ids_BxT is not None, causal, model_cfg.attention_impl))
    return ops.REGISTRY["attention"]["xla"].fn(
      q,
      k,
      v,
      mask_Bx1xTxS=mask_Bx1xTxS,
      q_segment_ids_BxT=None,
      kv_segment_ids_BxS=None,
      causal=causal,
      model_cfg=model_cfg,
    )

  monkeypatch.setitem(dispatch.REGISTRY["attention"], "recording", None)  # removed again after the test
  ops.register_attention("recording", recording, needs_segment_ids=True)
  cfg = tiny_config().model
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 260, (2, 8)))
  module = model_lib.build(cfg)
  variables = jax.jit(module.init)(jax.random.key(0), tokens)
  cfg = tiny_config(attention_impl="recording").model  # past the config's choices: tests register their own
  custom = model_lib.build(cfg)
  np.testing.assert_allclose(custom.apply(variables, tokens), module.apply(variables, tokens), atol=1e-5)
  assert calls == [(True, True, "recording")] * cfg.num_layers
  q = jnp.ones((1, 2, 4, 8))
  ops.attention.attention(q, q, q, jnp.ones((1, 1, 2, 2), bool), cfg)  # a bare mask: no segment ids
  assert len(calls) == cfg.num_layers


def test_activation_and_parameter_shardings_on_an_8_device_mesh(monkeypatch):
  """fsdp x tensor on 8 CPU devices: parameters follow the rules and activations stay batch-sharded inside
  every block, as on an accelerator. The contrast: forcing the (unpartitioned) CPU kernels gathers them."""
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 1, 2), ("data", "fsdp", "expert", "tensor"))
  rules = config_lib.mesh_rules(config)
  module = model_lib.build(config.model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 260, (8, 16)))
  boxed = jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda key: nn.meta.unbox(module.init(key, tokens)["params"]), out_shardings=shardings)(
      jax.random.key(0)
    )
  attention = params["decoder"]["layer_0"]["self_attention"]
  assert attention["query"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor", None)
  assert attention["out"]["kernel"].sharding.spec == PartitionSpec("tensor", None, "fsdp")
  assert params["decoder"]["layer_0"]["mlp"]["up"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")

  def rows_per_device(force_target=None):
    """Rows of each Norm, attention and MLP output that one device holds, after partitioning."""
    if force_target:
      monkeypatch.setattr(dispatch, "current_target", lambda: force_target)
    rows = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, (layers.Norm, layers.Attention, layers.Mlp)) and context.method_name == "__call__":
        name = type(context.module).__name__
        jax.debug.inspect_array_sharding(
          out, callback=lambda s, n=name: rows.setdefault(n, set()).add(s.shard_shape(out.shape)[0])
        )
      return out

    def forward(params, tokens):
      with nn.intercept_methods(record):
        return module.apply({"params": params}, tokens)

    batch = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      hlo = jax.jit(forward).lower(params, batch).compile().as_text()
    return rows, "jaxlm_" in hlo

  rows, custom_calls = rows_per_device()
  assert rows == {"Norm": {2}, "Attention": {2}, "Mlp": {2}} and not custom_calls  # 8 rows over data x fsdp = 4
  if cpu_kernels.available():
    rows, custom_calls = rows_per_device(force_target=ops.Target("cpu", 1))
    assert custom_calls and 8 in rows["Norm"]  # the kernel's operands gathered onto every device
