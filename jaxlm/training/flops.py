"""FLOP counting, MFU, and metric writers (console, JSONL, TensorBoard).

FLOP convention (PaLM, appendix B; also nanoGPT and MaxText): a training
token costs 6 * N_matmul + 12 * num_layers * seq_len * (num_heads * head_dim)
FLOPs, where N_matmul counts every weight that takes part in a matrix
multiply (attention and MLP kernels and the output projection, which is the
tied embedding when embeddings are tied) and not the embedding lookups, norms
or biases. The attention term counts QK^T and AV for forward and backward
without halving for the causal mask. MFU is achieved FLOP/s over peak FLOP/s;
`PeakFlops` says which peak (a chip's published one, or one measured here).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.ops import dispatch
from jaxlm.storage import fs
from jaxlm.training import chips
from jaxlm.training import step as train_step


def matmul_params(model_cfg: config_lib.ModelConfig) -> int:
  """Weights that take part in matrix multiplies, per the convention above, for the model sub-config."""
  m = model_cfg
  hd, kv = config_lib.head_dim(m), config_lib.num_kv_heads(m)
  attention = m.d_model * hd * (2 * m.num_heads + 2 * kv)
  mlp = m.d_model * m.mlp_dim * (3 if m.mlp == "swiglu" else 2)
  self_layers, cross_layers = families.get(m.family).attention_layers(m)
  return self_layers * (attention + mlp) + cross_layers * attention + m.d_model * m.vocab_size


def flops_per_token(model_cfg: config_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the model sub-config: 6 * N_matmul + 12 * layers * seq_len * attention width
  (self- and cross-attention layers both count)."""
  m = model_cfg
  attention_width = m.num_heads * config_lib.head_dim(m)
  num_attention_layers = sum(families.get(m.family).attention_layers(m))
  return 6 * matmul_params(m) + 12 * num_attention_layers * seq_len * attention_width


def _xla_matmul(x_NxN, w_NxN, bias_N):
  return x_NxN @ w_NxN


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5, matmul=None, best: bool = False) -> float:
  """FLOP/s of an (n, n) @ (n, n) product on the default device: the median of `repeats` timings, or the
  fastest with `best`. `matmul(x_NxN, w_NxN, bias_N)` defaults to `jnp.dot` (XLA's matmul)."""
  a, bias = jnp.ones((n, n), dtype), jnp.zeros((n,), dtype)
  dot = jax.jit(matmul or _xla_matmul)  # jit caches per function: a module-level one compiles once
  dot(a, a, bias).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a, bias).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(min(times) if best else np.median(times))


class PeakFlops:
  """What MFU divides by: FLOP/s of all devices together, and a label saying what that figure is.

  TPU and GPU: the chip's published dense bf16 peak (`jaxlm.training.chips.CHIPS`) times the devices, whatever the
  compute dtype, as MaxText reports it; the figure is fixed. Elsewhere (CPU, or a chip missing from the
  table): measured, because a CPU's peak is whatever its cores give now, and on a shared host that moves
  by 2x within minutes. `measure()` times the fastest matmul the step can run (XLA's dot and, when the
  step's dense layers use it, the BLAS kernel of jaxlm/ops/cpu_kernels.py) on a (1024, 1024) product, best of
  3, so an MFU and its peak come from the same moment. An MFU above 1 can still happen (the load changed
  between the two); it is printed as it is, never capped, with this label. `refresh()` measures again
  unless that would take more than 5% of the time since the last measurement.

  config: the whole config (compute dtype, model sub-config for the dense kernel's choice).
  num_devices: the devices the step runs on.
  """

  _SIZE, _REPEATS = 1024, 3

  def __init__(self, config, num_devices: int):
    device = jax.devices()[0]
    self.dtype = train_step.compute_dtype(config)
    kind = chips.chip_for_device_kind(device.device_kind)
    self.measured = kind is None
    if not self.measured:
      self.flops = chips.CHIPS[kind].peak_flops * num_devices
      self.label = (
        f"the published bf16 peak of {num_devices} x {device.device_kind} "
        f"({chips.CHIPS[kind].peak_flops / 1e12:,.0f} TFLOP/s each)"
      )
      return
    dense = dispatch.choose("dense", config.model, self.dtype, target=dispatch.Target(device.platform, num_devices))
    self.matmuls = {"XLA dot": None}
    if dense != "xla":
      self.matmuls[f"the {dense} dense kernel"] = dispatch.REGISTRY["dense"][dense].fn
    # A CPU device's matmul uses every core of its host (fake devices share them): one host per process.
    self.hosts = jax.process_count() if device.platform == "cpu" else num_devices
    self.label = (
      f"the fastest {jnp.dtype(self.dtype).name} matmul ({', '.join(self.matmuls)}) measured "
      f"again at log lines on {self.hosts} {'host' if device.platform == 'cpu' else device.device_kind}"
      f"{'s' if self.hosts > 1 else ''}"
    )
    self.flops, self.seconds_measuring, self.measured_at = 0.0, 0.0, -math.inf
    self.measure()

  def measure(self) -> float:
    """Re-measures a measured peak (a published one stays); returns FLOP/s of all devices together."""
    if self.measured:
      start = time.perf_counter()
      self.flops = self.hosts * max(
        measure_matmul_peak(self._SIZE, self.dtype, self._REPEATS, matmul, best=True)
        for matmul in self.matmuls.values()
      )
      self.measured_at = time.perf_counter()
      self.seconds_measuring = self.measured_at - start
    return self.flops

  def refresh(self) -> float:
    """`measure()` if the last measurement is at least 20x its own duration ago (at most 5% of the time);
    returns FLOP/s of all devices together."""
    if self.measured and time.perf_counter() - self.measured_at >= 20 * self.seconds_measuring:
      self.measure()
    return self.flops


def format_mfu(mfu: float, peak_flops: float, peak: PeakFlops) -> str:
  """'mfu 53.1% of 45.2 GFLOP/s measured' (or 'of the published peak'): an MFU never goes out without what it
  is relative to; one above 100% says why it can be."""
  scale, unit = (1e12, "TFLOP/s") if peak_flops >= 1e12 else (1e9, "GFLOP/s")
  text = f"mfu {mfu:.1%} of {peak_flops / scale:,.4g} {unit} " + ("measured" if peak.measured else "published peak")
  if mfu > 1 and peak.measured:
    text += " (above 100%: the host's load changed between the steps and the peak measurement)"
  return text


class MetricWriter:
  """Writes scalars to a JSONL file and TensorBoard event files, on process 0 only.

  Every process computes the same (replicated) metrics; only writing is
  limited to one, so no process waits on another to log.
  """

  def __init__(self, workdir: Path):
    """Opens (appends to) workdir/metrics.jsonl and workdir/tensorboard/."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    # Local or gs:// (see jaxlm/storage/fs.py): a bucket's copy is rewritten at most every 30 s and on close.
    self.jsonl = fs.AppendFile(fs.join(workdir, "metrics.jsonl"))
    self.tensorboard = fs.tensorboard_writer(fs.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes `scalars` (name -> float) at `step`, flushed at once."""
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    """Closes both files."""
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
