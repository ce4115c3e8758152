"""jaxlm.ops.cpu_kernels: the CPU attention and norm kernels equal the XLA code they replace.

The attention kernel is also checked against jax.nn in test_attention.py, which
runs every attention test on both paths.
"""

import ctypes
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from support import REPO, tiny_config

from jaxlm import ops, runtime
from jaxlm.models import layers
from jaxlm.models import transformer as model_lib
from jaxlm.ops import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: the CPU kernels are not built")


def _both_paths(make_fn, *args):
  """make_fn(use_kernels)'s value with the kernels, then without; asserts each took the path it claims."""
  results = []
  for use_kernels in (True, False):
    fn = make_fn(use_kernels)
    assert ("jaxlm_" in str(jax.make_jaxpr(fn)(*args))) == use_kernels
    results.append(jax.jit(fn)(*args))
  return results


@pytest.mark.parametrize("norm,use_bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_norm_matches_xla(norm, use_bias):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5, 40)) * 3 + 1, jnp.float32)  # 40: whole vectors plus a tail
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def make_fn(use_kernels):
    module = layers.Norm(tiny_config(norm=norm, use_bias=use_bias, d_model=40, cpu_kernels=use_kernels).model)

    def value_and_grads(params, x):
      y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
      return y, vjp(cotangent)

    return value_and_grads

  params = jax.tree.map(
    lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype),
    layers.Norm(tiny_config(norm=norm, use_bias=use_bias, d_model=40).model).init(jax.random.key(0), x)["params"],
  )
  (y_kernel, g_kernel), (y_xla, g_xla) = _both_paths(make_fn, params, x)
  np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(params=["MKL", "OpenBLAS"])
def blas(request):
  """The dense kernel on each BLAS that is installed; the process's choice is restored afterwards."""
  chosen = cpu_kernels.blas()
  loaders = {"MKL": cpu_kernels._mkl_sgemm, "OpenBLAS": cpu_kernels._openblas_sgemm}
  try:
    sgemm = loaders[request.param]()
  except (ImportError, StopIteration, OSError) as error:
    pytest.skip(f"{request.param} is not installed: {error!r}")
  library = cpu_kernels._kernel_library()
  library.JaxlmSetSgemm(ctypes.cast(sgemm, ctypes.c_void_p))
  yield request.param
  library.JaxlmSetSgemm(ctypes.cast(loaders[chosen](), ctypes.c_void_p))


@pytest.mark.parametrize("m,k,n", [(37, 48, 20), (37, 20, 48), (1, 8, 8)])  # both weight-gradient splits, one row
def test_dense_matches_xla(m, k, n, blas):
  rng = np.random.default_rng(m + k + n)
  x, w, bias, cotangent = (
    jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((m, k), (k, n), (n,), (m, n))
  )
  ref = lambda x, w, bias: jnp.dot(x, w, precision="highest") + bias
  y_ref, vjp_ref = jax.vjp(ref, x, w, bias)
  y_ours, vjp_ours = jax.vjp(jax.jit(cpu_kernels.dense), x, w, bias)
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(vjp_ours(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy,saved", [("dots", True), ("dots_no_batch", True), ("full", False)])
def test_dots_remat_policies_save_the_dense_kernels_outputs(policy, saved, capsys):
  """The dense kernel is a custom call, not a dot; the `dots` policies must still keep its output."""
  if not cpu_kernels.blas():
    pytest.skip("no BLAS for the dense kernel")
  rng = np.random.default_rng(4)
  x, w = jnp.asarray(rng.standard_normal((2, 40, 16)), jnp.float32), jnp.asarray(rng.standard_normal((16, 24)))
  cfg = tiny_config().model
  project = lambda x, w: jnp.sum(jnp.tanh(ops.projection(x, [(w, None)], jnp.float32, cfg)[0]))
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(project, policy=layers._REMAT_POLICIES[policy]), x, w)
  assert (f"named '{ops.dense.CPU_DENSE}'" in capsys.readouterr().out) == saved


def test_bias_gelu_mlp_matches_xla():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def make_fn(use_kernels):
    module = layers.Mlp(tiny_config(mlp="gelu", mlp_dim=40, cpu_kernels=use_kernels).model)

    def value_and_grads(params, x):
      y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
      return y, vjp(cotangent)

    return value_and_grads

  params = jax.tree.map(
    lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype),
    layers.Mlp(tiny_config(mlp_dim=40).model).init(jax.random.key(0), x)["params"],
  )
  (y_kernel, g_kernel), (y_xla, g_xla) = _both_paths(make_fn, params, x)
  np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "style", [{}, dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2)]
)
def test_model_on_a_mesh_matches_xla(style):
  """Batch sharded over 8 CPU devices: XLA gathers the custom calls' operands, and the result is the same."""
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(4, 260, (8, 32)))
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 8 + [0] * 4], 8, axis=0))
  positions = jnp.asarray(np.repeat([list(range(20)) + list(range(8)) + [0] * 4], 8, axis=0))
  params = jax.jit(model_lib.build(tiny_config(**style).model).init)(jax.random.key(0), tokens)["params"]
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (tokens, segments, positions)]

  def make_fn(use_kernels):
    module = model_lib.build(tiny_config(**style, cpu_kernels=use_kernels).model)

    def loss(params, tokens, segments, positions):
      log_probs = jax.nn.log_softmax(module.apply({"params": params}, tokens, segments, positions))
      picked = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
      return -jnp.mean(picked * (segments[:, 1:] > 0))

    return jax.value_and_grad(loss)

  (loss_kernel, g_kernel), (loss_xla, g_xla) = _both_paths(make_fn, params, *batch)
  np.testing.assert_allclose(loss_kernel, loss_xla, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_kernel), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t,n,k,causal", [(128, 4, 2, True), (33, 4, 1, False), (96, 2, 2, True)])
def test_self_attention_on_the_fused_projection_matches_jax(t, n, k, causal):
  """q, k and v read in place from qkv [B, T, N+2K, H]; d_qkv comes back in that layout."""
  b, h = 2, 16
  rng = np.random.default_rng(t + n + k)
  qkv = jnp.asarray(rng.standard_normal((b, t, n + 2 * k, h)), jnp.float32)
  segments = np.ones((b, t), np.int32)
  segments[:, t // 2 :] = 2
  segments[0, -5:] = 0  # padding queries see no key
  mask = layers.attention_mask(jnp.asarray(segments), jnp.asarray(segments), causal=causal)
  cotangent = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  ref = lambda x: jax.nn.dot_product_attention(x[:, :, :n], x[:, :, n : n + k], x[:, :, n + k :], mask=mask)
  ours = lambda x: cpu_kernels.self_attention(x, mask[:, 0], causal, n)
  out_ref, vjp_ref = jax.vjp(ref, qkv)
  out_ours, vjp_ours = jax.vjp(jax.jit(ours), qkv)
  np.testing.assert_allclose(out_ours, out_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vjp_ours(cotangent)[0], vjp_ref(cotangent)[0], rtol=1e-4, atol=1e-5)


def test_attention_under_vmap():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 16, 2, 8)), jnp.float32) for _ in range(3))
  seg = jnp.ones((3, 16), jnp.int32)
  mask = layers.attention_mask(seg, seg, causal=True)[:, 0]
  attend = lambda q, k, v: cpu_kernels.attention(q, k, v, mask, True)
  batched = jax.jit(jax.vmap(attend))(q, k, v)
  for i in range(2):
    np.testing.assert_allclose(
      batched[i], jax.nn.dot_product_attention(q[i], k[i], v[i], mask=mask[:, None]), rtol=1e-5, atol=1e-5
    )


def test_build_goes_to_the_cache_once(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLM_CACHE_DIR", str(tmp_path))
  compiler = cpu_kernels._compiler()
  library = cpu_kernels._build(compiler)
  assert library.parent == tmp_path and library.name.startswith("kernels-") and library.suffix == ".so"
  built_at = library.stat().st_mtime_ns
  assert cpu_kernels._build(compiler) == library and library.stat().st_mtime_ns == built_at
  assert list(tmp_path.iterdir()) == [library]  # no temporary directory left behind


def test_without_a_compiler_falls_back_with_one_warning(tmp_path):
  code = (
    "import jax.numpy as jnp; from jaxlm import config, ops; from jaxlm.models import layers\n"
    "seg = jnp.ones((1, 8), jnp.int32); x = jnp.ones((1, 8, 2, 4)); cfg = config.base_config().model\n"
    "out = ops.attention.attention(x, x, x, layers.segment_mask(seg, seg, True), cfg, causal=True)\n"
    "print(ops.choose('attention', cfg, jnp.float32), bool(jnp.all(out == 1)))\n"
  )
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JAXLM_CACHE_DIR=str(tmp_path / "cache"))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["xla", "True"]
  assert result.stderr.count("jaxlm: CPU kernels unavailable, using slower XLA code") == 1, result.stderr
  assert not list((tmp_path / "cache").glob("*.so"))


def test_calling_an_unbuilt_kernel_says_so(monkeypatch):
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  with pytest.raises(RuntimeError, match="CPU kernels are not built"):
    cpu_kernels.norm(jnp.ones((2, 4)), jnp.ones(4), jnp.zeros(4), False, 1e-5)


def test_retain_freed_memory_stops_refaulting_large_blocks():
  """A freed 200 MB block comes back without page faults after retain_freed_memory(), and not before."""
  # Plain malloc + memset, as XLA's allocator does (numpy asks for huge pages, which hides the effect).
  code = (
    "import ctypes, resource, sys\n"
    "from jaxlm import runtime\n"
    "applied = runtime.retain_freed_memory() if sys.argv[1] == 'on' else False\n"
    "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
    "faults = []\n"
    "for _ in range(2):\n"
    "  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "  block = libc.malloc(200_000_000); ctypes.memset(block, 1, 200_000_000)\n"
    "  libc.free(ctypes.c_void_p(block))\n"
    "  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    "print(applied, faults[0], faults[1])\n"
  )
  results = {}
  for mode in ("on", "off"):
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, first, second = out.stdout.split()
    results[mode] = (applied, int(first), int(second))
  assert results["on"][0] == "True" and results["off"][0] == "False"
  assert results["off"][2] > 40_000  # 200 MB of 4 kB pages, faulted again
  assert results["on"][2] < results["on"][1] / 10


_NARROW_BUILD_CHECK = """
import os, sys
import jax, jax.numpy as jnp, numpy as np
from jaxlm.ops import cpu_kernels
from jaxlm.models import layers
cpu_kernels._FLAGS = [f"-march={sys.argv[1]}" if f == "-march=native" else f for f in cpu_kernels._FLAGS]
assert cpu_kernels.available()
rng = np.random.default_rng(0)
errors = []
def check(ours, ref, *args):
  out, vjp = jax.vjp(jax.jit(ours), *args)
  out_ref, vjp_ref = jax.vjp(ref, *args)
  ct = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for a, b in zip((out, *vjp(ct)), (out_ref, *vjp_ref(ct))):
    errors.append(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-9)))
n, k = 4, 2
qkv = jnp.asarray(rng.standard_normal((2, 70, n + 2 * k, 12)), jnp.float32)  # 70, 12: vector tails everywhere
seg = jnp.asarray(np.r_[[1] * 40 + [2] * 25 + [0] * 5, [1] * 70].reshape(2, 70))
mask = layers.attention_mask(seg, seg, causal=True)
check(lambda x: cpu_kernels.self_attention(x, mask[:, 0], True, n),
      lambda x: jax.nn.dot_product_attention(x[:, :, :n], x[:, :, n:n + k], x[:, :, n + k:], mask=mask), qkv)
x, v = jnp.asarray(rng.standard_normal((33, 40)), jnp.float32), jnp.asarray(rng.standard_normal(40), jnp.float32)
check(lambda x, s: cpu_kernels.norm(x, s, v, False, 1e-5),
      lambda x, s: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * s + v, x, v)
check(cpu_kernels.bias_gelu, lambda x, b: jax.nn.gelu(x + b, approximate=True), x, v)
print(max(errors))
"""


@pytest.mark.slow
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2 (8 floats per vector) and SSE (4)
def test_narrower_vector_builds_match_xla(march, tmp_path):
  """The kernels' 8- and 4-float vector paths, which an AVX-512 machine never compiles by itself."""
  if platform.machine() != "x86_64":
    pytest.skip("x86-64 -march names")
  env = dict(os.environ, JAXLM_CACHE_DIR=str(tmp_path))
  result = subprocess.run(
    [sys.executable, "-c", _NARROW_BUILD_CHECK, march], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.split()[-1]) < 1e-4


def test_a_tpu_compiler_alone_is_no_accelerator(monkeypatch):
  """libtpu installed to compile for TPU slices on a CPU host keeps the CPU's memory setting; TPU chips do not."""
  monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: name == "libtpu" or None)
  monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [])
  assert not runtime.has_accelerator()
  monkeypatch.setattr(runtime.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
  assert runtime.has_accelerator()
