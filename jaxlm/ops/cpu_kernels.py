"""Float32 kernels for XLA:CPU (`csrc/`), built on first use and called through `jax.ffi`.

XLA:CPU runs attention as separate batched matmuls and elementwise passes over
the T x S scores, splits each LayerNorm and GELU into several fusions, and its
matmuls trail MKL's by 20-30% on two cores. `attention`/`self_attention` fuse
attention per (batch, head) and skip the key tiles that causal attention never
reads; `norm` and `bias_gelu` do their forward or backward in one pass per row
block; `dense` calls MKL or OpenBLAS (`blas()`), split across XLA's threads.
Each has its own VJP. Measurements are in BENCHMARKS.md, "Fourth pass".

The library is compiled once per machine with the system C++ compiler
(`$CXX`, else g++ or c++) and `-march=native`, into
`$JAXLM_CACHE_DIR` (default `~/.cache/jaxlm`), named by a hash of the source,
the compiler, jaxlib's version and the CPU's instruction set, so hosts that
share a home directory never load each other's builds. Without a compiler, or
if the build fails, `jaxlm.ops` uses XLA's code with one warning. The
model config's `model.cpu_kernels = False` turns them off; `jaxlm export`
does so, since `jax.export` accepts no custom calls and its artifacts must
run anywhere. `jaxlm.ops.dispatch.choose` is the one place that decides
where they run: a CPU target of one device, in float32.

The one process-wide setting that goes with them, `retain_freed_memory()`, is in `jaxlm.runtime`.

A custom call is not partitioned: XLA would gather its operands and every
device compute all of it. So under a mesh of more than one device (set with
`jax.set_mesh`) the ops stand them aside, and activations keep the shardings
an accelerator gets; accelerators never use these kernels.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cc"))
_HEADERS = sorted((Path(__file__).with_name("csrc")).glob("*.h"))
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC"]

# Where these kernels run, for every op that registers one (`dispatch.Implementation`'s fields): chosen by the
# dispatcher itself (never named by a config) for a CPU target of one device, in float32.
WHERE_THEY_RUN = dict(platforms=("cpu",), dtypes=(jnp.float32,), single_device=True, automatic=True)


def _cpu_signature() -> str:
  """The CPU's feature flags: a build for one instruction set must not load on another."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
  sources = [path.read_bytes() for path in _SOURCES + _HEADERS]
  key = hashlib.sha256(
    b"\0".join(
      [*sources, compiler.encode(), " ".join(_FLAGS).encode(), jaxlib.__version__.encode(), _cpu_signature().encode()]
    )
  ).hexdigest()[:16]
  cache = Path(os.environ.get("JAXLM_CACHE_DIR", Path.home() / ".cache" / "jaxlm"))
  library = cache / f"kernels-{key}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent processes never load a half-written file.
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    partial = Path(tmp) / library.name
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()[-1:]
      raise RuntimeError(f"{' '.join(command)} failed: {errors[0] if errors else 'no output'}")
    os.replace(partial, library)
  return library


@functools.cache
def _kernel_library() -> ctypes.CDLL | None:
  """Builds (or finds), loads and registers the kernels; None, with one warning, where that is impossible."""
  compiler = _compiler()
  if compiler is None:
    warnings.warn(
      "jaxlm: no C++ compiler (set CXX or install g++); CPU kernels off, using slower XLA code", stacklevel=3
    )
    return None
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
  except (OSError, RuntimeError) as error:
    warnings.warn(f"jaxlm: CPU kernels unavailable, using slower XLA code: {error}", stacklevel=3)
    return None
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return library


def available() -> bool:
  """True once the kernels are built and registered (the first call builds them)."""
  return _kernel_library() is not None


_TARGETS = {
  "jaxlm_attention_forward": "JaxlmAttentionForward",
  "jaxlm_attention_backward": "JaxlmAttentionBackward",
  "jaxlm_packed_attention_forward": "JaxlmPackedAttentionForward",
  "jaxlm_packed_attention_backward": "JaxlmPackedAttentionBackward",
  "jaxlm_norm_forward": "JaxlmNormForward",
  "jaxlm_norm_backward": "JaxlmNormBackward",
  "jaxlm_bias_gelu_forward": "JaxlmBiasGeluForward",
  "jaxlm_bias_gelu_backward": "JaxlmBiasGeluBackward",
  "jaxlm_dense_forward": "JaxlmDenseForward",
  "jaxlm_dense_backward": "JaxlmDenseBackward",
}


def _mkl_sgemm():
  """cblas_sgemm from Intel MKL (the optional `mkl` wheel, x86-64), sequential."""
  path = next(f.locate() for f in importlib.metadata.files("mkl") or [] if f.name.startswith("libmkl_rt.so"))
  blas = ctypes.CDLL(str(path))
  # MKL_THREADING_SEQUENTIAL, since the kernel splits the work across XLA's threads. (The C name: the
  # lowercase mkl_set_threading_layer is the Fortran one and takes a pointer.)
  blas.MKL_Set_Threading_Layer(1)
  return blas.cblas_sgemm


def _openblas_sgemm():
  """cblas_sgemm from the scipy-openblas32 wheel, single-threaded."""
  import scipy_openblas32

  blas = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)))
  # The wheel prefixes every symbol with scipy_, so it never clashes with numpy's own OpenBLAS.
  blas.scipy_openblas_set_num_threads(1)  # the kernel splits the work across XLA's threads
  return blas.scipy_cblas_sgemm


@functools.cache
def blas() -> str | None:
  """Hands an sgemm to `dense` and names its library: "MKL" if the `mkl` wheel is installed, else
  "OpenBLAS" (scipy-openblas32, a dependency); None, with one warning, without either."""
  library = _kernel_library()
  if library is None:
    return None
  errors = []
  for name, load in (("MKL", _mkl_sgemm), ("OpenBLAS", _openblas_sgemm)):
    try:
      library.JaxlmSetSgemm(ctypes.cast(load(), ctypes.c_void_p))
      return name
    except (ImportError, StopIteration, OSError, AttributeError) as error:  # ImportError covers PackageNotFoundError
      errors.append(f"{name}: {error!r}")
  warnings.warn(f"jaxlm: no BLAS for the CPU dense kernel, using XLA's matmuls ({'; '.join(errors)})", stacklevel=2)
  return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(
  q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_BxTxS: jax.Array, causal: bool
) -> jax.Array:
  """softmax(q k^T / sqrt(H), masked) v in jaxlm's layouts; `causal` as in `attention.dot_product_attention`."""
  return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal)[0]


def _ffi_call(target, result_shapes):
  if not available():
    raise RuntimeError(
      "jaxlm: the CPU kernels are not built (see the warning above); "
      "check cpu_kernels.available() before calling them, as jaxlm.ops does"
    )
  return jax.ffi.ffi_call(target, result_shapes, vmap_method="sequential")


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal):
  b, t, n, _ = q_BxTxNxH.shape
  out_BxTxNxH, lse_BxNxT = _ffi_call(
    "jaxlm_attention_forward",
    (jax.ShapeDtypeStruct(q_BxTxNxH.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
  )(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal=causal)
  return out_BxTxNxH, (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, out_BxTxNxH, lse_BxNxT)


def _backward(causal, residuals, d_out_BxTxNxH):
  q, k, v, mask, _, _ = residuals
  d_q, d_k, d_v = _ffi_call(
    "jaxlm_attention_backward", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  )(*residuals, d_out_BxTxNxH, causal=causal)
  return d_q, d_k, d_v, None


attention.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def self_attention(qkv_BxTxCxH: jax.Array, mask_BxTxT: jax.Array, causal: bool, num_heads: int) -> jax.Array:
  """`attention` on the fused projection's output: qkv holds N query heads, then K key and K value heads.

  Reading the three from one array saves splitting it, and the backward pass
  returns d_qkv in the same layout, which saves concatenating the gradients.
  """
  return _self_attention_forward(qkv_BxTxCxH, mask_BxTxT, causal, num_heads)[0]


def _self_attention_forward(qkv_BxTxCxH, mask_BxTxT, causal, num_heads):
  b, t, _, h = qkv_BxTxCxH.shape
  out_BxTxNxH, lse_BxNxT = _ffi_call(
    "jaxlm_packed_attention_forward",
    (jax.ShapeDtypeStruct((b, t, num_heads, h), jnp.float32), jax.ShapeDtypeStruct((b, num_heads, t), jnp.float32)),
  )(qkv_BxTxCxH, mask_BxTxT, causal=causal, num_heads=np.int64(num_heads))
  return out_BxTxNxH, (qkv_BxTxCxH, mask_BxTxT, out_BxTxNxH, lse_BxNxT)


def _self_attention_backward(causal, num_heads, residuals, d_out_BxTxNxH):
  qkv_BxTxCxH, mask_BxTxT = residuals[:2]
  d_qkv = _ffi_call("jaxlm_packed_attention_backward", jax.ShapeDtypeStruct(qkv_BxTxCxH.shape, jnp.float32))(
    *residuals, d_out_BxTxNxH, causal=causal, num_heads=np.int64(num_heads)
  )
  return d_qkv, None


self_attention.defvjp(_self_attention_forward, _self_attention_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x_MxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, rms: bool, eps: float) -> jax.Array:
  """LayerNorm (x - mean) * rstd * scale + bias over the last axis; RMSNorm (`rms`) skips the centering."""
  return _norm_forward(x_MxD, scale_D, bias_D, rms, eps)[0]


def _norm_forward(x_MxD, scale_D, bias_D, rms, eps):
  m = x_MxD.shape[0]
  row = jax.ShapeDtypeStruct((m,), jnp.float32)
  y_MxD, mean_M, rstd_M = _ffi_call("jaxlm_norm_forward", (jax.ShapeDtypeStruct(x_MxD.shape, jnp.float32), row, row))(
    x_MxD, scale_D, bias_D, rms=rms, eps=np.float32(eps)
  )
  return y_MxD, (x_MxD, scale_D, mean_M, rstd_M)


def _norm_backward(rms, eps, residuals, d_y_MxD):
  x_MxD, scale_D = residuals[:2]
  d_x, d_scale, d_bias = _ffi_call(
    "jaxlm_norm_backward",
    (jax.ShapeDtypeStruct(x_MxD.shape, jnp.float32), *[jax.ShapeDtypeStruct(scale_D.shape, jnp.float32)] * 2),
  )(*residuals, d_y_MxD, rms=rms)
  return d_x, d_scale, d_bias


norm.defvjp(_norm_forward, _norm_backward)


@jax.custom_vjp
def bias_gelu(x_MxF: jax.Array, bias_F: jax.Array) -> jax.Array:
  """gelu(x + bias) with GELU's tanh approximation, as `nn.gelu(approximate=True)`."""
  return _bias_gelu_forward(x_MxF, bias_F)[0]


def _bias_gelu_forward(x_MxF, bias_F):
  y_MxF = _ffi_call("jaxlm_bias_gelu_forward", jax.ShapeDtypeStruct(x_MxF.shape, jnp.float32))(x_MxF, bias_F)
  return y_MxF, (x_MxF, bias_F)


def _bias_gelu_backward(residuals, d_y_MxF):
  x_MxF, bias_F = residuals
  return tuple(
    _ffi_call(
      "jaxlm_bias_gelu_backward",
      (jax.ShapeDtypeStruct(x_MxF.shape, jnp.float32), jax.ShapeDtypeStruct(bias_F.shape, jnp.float32)),
    )(x_MxF, bias_F, d_y_MxF)
  )


bias_gelu.defvjp(_bias_gelu_forward, _bias_gelu_backward)


@jax.custom_vjp
def dense(x_MxK: jax.Array, w_KxN: jax.Array, bias_N: jax.Array) -> jax.Array:
  """x @ w + bias in float32 through MKL or OpenBLAS (see `blas()`); check `blas()` first."""
  return _dense_forward(x_MxK, w_KxN, bias_N)[0]


def _dense_forward(x_MxK, w_KxN, bias_N):
  y_MxN = _ffi_call("jaxlm_dense_forward", jax.ShapeDtypeStruct((x_MxK.shape[0], w_KxN.shape[1]), jnp.float32))(
    x_MxK, w_KxN, bias_N
  )
  return y_MxN, (x_MxK, w_KxN)


def _dense_backward(residuals, d_y_MxN):
  x_MxK, w_KxN = residuals
  shapes = (x_MxK.shape, w_KxN.shape, (w_KxN.shape[1],))
  return tuple(
    _ffi_call("jaxlm_dense_backward", tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))(
      x_MxK, w_KxN, d_y_MxN
    )
  )


dense.defvjp(_dense_forward, _dense_backward)
