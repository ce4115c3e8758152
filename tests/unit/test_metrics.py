"""The FLOP formula against a hand count and against XLA's own count; the cached peak MFU divides by."""

import json

import jax
import numpy as np
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.training import flops as metrics
from jaxlm.training import step as train_lib


def reference_model():
  c = config_lib.base_config().model
  c.num_layers, c.d_model, c.num_heads, c.mlp_dim, c.vocab_size, c.max_len = 6, 384, 6, 1536, 256, 256
  return c


def test_flops_per_token_hand_count():
  # Reference config of issue 5, counted by hand:
  #   per layer: q, k, v, out = 4 * 384 * 384 = 589,824; MLP = 2 * 384 * 1536 = 1,179,648
  #   6 layers: 6 * 1,769,472 = 10,616,832; output projection (tied) 256 * 384 = 98,304
  #   N_matmul = 10,715,136 -> 6N = 64,290,816
  #   attention: 12 * 6 layers * 256 positions * 384 = 7,077,888
  assert metrics.matmul_params(reference_model()) == 10_715_136
  assert metrics.flops_per_token(reference_model(), 256) == 64_290_816 + 7_077_888


def test_flops_gqa_and_swiglu_hand_count():
  c = reference_model()
  c.num_kv_heads, c.mlp = 2, "swiglu"
  # q + out: 2 * 384 * 384; k + v with 2 heads of 64: 2 * 384 * 128; MLP: 3 * 384 * 1536
  per_layer = 2 * 384 * 384 + 2 * 384 * 128 + 3 * 384 * 1536
  assert metrics.matmul_params(c) == 6 * per_layer + 256 * 384


def test_flops_formula_matches_xla_cost_analysis():
  """XLA's count of the compiled train step is within 10% of 6N + attention (it also counts norms, softmax, Adam)."""
  cfg = tiny_config()
  cfg.model.d_model, cfg.model.num_heads, cfg.model.mlp_dim = 128, 4, 512
  cfg.model.max_len = cfg.data.seq_len = 64
  cfg.model.cpu_kernels = False  # XLA cannot count the FLOPs inside custom calls
  cfg.mesh.data = 1
  with jax.default_device(jax.devices()[0]):
    devices = jax.devices()[:1]
    mesh = jax.sharding.Mesh(np.array(devices).reshape((1,) * len(mesh_lib.AXES)), mesh_lib.AXES)
    s = train_lib.setup(cfg, mesh)
    state = jax.eval_shape(s.init_fn, jax.random.key(0))
    batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype)
      for k, v in train_lib.example_batch(cfg, cfg.train.global_batch_size).items()
    }
    compiled = train_lib.make_train_step(s).lower(state, batch, jax.random.key(0)).compile()
  xla_flops = compiled.cost_analysis()["flops"]
  ours = metrics.flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch_size * cfg.data.seq_len
  assert 0.9 < xla_flops / ours < 1.15, xla_flops / ours


def test_chip_table_lookup_by_device_kind():
  from jaxlm.training import aot, chips

  kinds = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H200": "h200",
    "cpu": None,
    "NVIDIA L4": None,
    "TPU v3": None,
  }
  assert {kind: chips.chip_for_device_kind(kind) for kind in kinds} == kinds
  assert aot.CHIPS is chips.CHIPS  # one table, read by `jaxlm compile` and the trainer's MFU


def test_peak_on_a_chip_is_the_published_one(monkeypatch):
  class FakeTpu:
    device_kind, platform = "TPU v5 lite", "tpu"

  monkeypatch.setattr(jax, "devices", lambda *args: [FakeTpu()])
  peak = metrics.PeakFlops(tiny_config(), num_devices=4)
  assert not peak.measured and peak.flops == 4 * 197e12
  assert "published bf16 peak of 4 x TPU v5 lite" in peak.label
  assert metrics.format_mfu(0.4, peak.flops, peak) == "mfu 40.0% of 788 TFLOP/s published peak"


def test_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  calls = []
  real = metrics.measure_matmul_peak
  monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: calls.append(1) or real(*a, **k))
  peak = metrics.PeakFlops(tiny_config(), num_devices=8)
  assert peak.measured and peak.flops > 1e8 and calls  # measured: no cache yet
  cache = json.loads((tmp_path / "jaxlm" / "peak.json").read_text())
  assert cache[peak.key]["flops"] == peak.flops and metrics.machine_name(jax.devices()[0]) in peak.key
  assert f"nominal peak of 1 x {peak.machine}" in peak.label and str(tmp_path / "jaxlm" / "peak.json") in peak.label
  calls.clear()
  again = metrics.PeakFlops(tiny_config(), num_devices=8)
  assert again.flops == peak.flops and not calls  # the second run reads it: one fixed figure per machine
  # Above 100% is printed as it is, with what it is relative to and how to measure again.
  text = metrics.format_mfu(1.25, 40e9, peak)
  assert text.startswith("mfu 125.0% of 40 GFLOP/s nominal") and "delete" in text and "peak.json" in text


def test_frozen_weights_cost_no_weight_gradient():
  c = reference_model()
  full = metrics.flops_per_token(c, 256)
  # LoRA on query and value: those kernels' gradients are taken whole (6 per weight), the rest frozen (4).
  query_value = 6 * 2 * 384 * 384
  lora = metrics.flops_per_token(c, 256, trained="query,value")
  assert lora == 4 * 10_715_136 + 2 * query_value + 7_077_888 < full
  config = tiny_config()
  assert metrics.training_flops_per_token(config) == metrics.flops_per_token(config.model, config.data.seq_len)
  config.lora.rank, config.lora.targets = 4, "query,value"
  assert metrics.training_flops_per_token(config) < metrics.flops_per_token(config.model, config.data.seq_len)


def test_cpu_peak_includes_the_blas_dense_kernel_when_the_step_uses_it():
  from jaxlm.ops import dispatch

  config = tiny_config()
  one_device = dispatch.choose("dense", config.model, jax.numpy.float32, target=dispatch.Target("cpu", 1))
  assert ("the cpu dense kernel" in metrics.PeakFlops(config, num_devices=1).matmuls) == (one_device == "cpu")
  assert list(metrics.PeakFlops(config, num_devices=8).matmuls) == ["XLA dot"]  # a mesh: XLA's dots only
