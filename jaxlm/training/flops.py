"""FLOP counting, MFU, and what MFU divides by (a chip's published peak, or this machine's cached nominal one).

FLOP convention (PaLM, appendix B; also nanoGPT and MaxText): a training
token costs 6 * N_matmul + 12 * num_layers * seq_len * (num_heads * head_dim)
FLOPs, where N_matmul counts every weight that takes part in a matrix
multiply (attention and MLP kernels and the output projection, which is the
tied embedding when embeddings are tied) and not the embedding lookups, norms
or biases. The attention term counts QK^T and AV for forward and backward
without halving for the causal mask. A weight that does not train (the frozen
base of a LoRA run) costs 4 of the 6: its forward and the gradient through it,
not its own gradient. MFU is achieved FLOP/s over peak FLOP/s; `PeakFlops`
says which peak. The metric writers are in `jaxlm.training.tracking`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.ops import dispatch
from jaxlm.training import chips
from jaxlm.training import step as train_step


def _moe_layers(model_cfg: config_lib.ModelConfig) -> int:
  """The MoE layers of the model sub-config: every `moe_every`-th of the layers with an MLP (0 when dense)."""
  self_layers = families.get(model_cfg.family).attention_layers(model_cfg)[0]
  return self_layers // model_cfg.get("moe_every", 1) if model_cfg.get("moe_experts", 0) else 0


def inactive_params(model_cfg: config_lib.ModelConfig) -> int:
  """Expert weights a token does not use: (moe_experts - moe_top_k) SwiGLU experts in every MoE layer; the
  parameters minus these are the active ones."""
  m = model_cfg
  if not m.get("moe_experts", 0):
    return 0
  return _moe_layers(m) * (m.moe_experts - m.moe_top_k) * 3 * m.d_model * (m.moe_hidden or m.mlp_dim)


def projection_params(model_cfg: config_lib.ModelConfig) -> dict[str, int]:
  """{projection name: its weights summed over the layers} for the model sub-config: query, key, value, out
  (self- and cross-attention), up, gate (swiglu only), down, and 'output' (the vocabulary projection); with
  MoE layers (`model.moe_experts`) also the active weights of their 'experts' (top-k SwiGLU experts), 'router'
  and 'shared' experts, which replace those layers' up, gate and down."""
  m = model_cfg
  hd, kv = config_lib.head_dim(m), config_lib.num_kv_heads(m)
  self_layers, cross_layers = families.get(m.family).attention_layers(m)
  attention_layers = self_layers + cross_layers
  moe_layers = _moe_layers(m)
  dense_layers = self_layers - moe_layers
  counts = {
    "query": attention_layers * m.d_model * m.num_heads * hd,
    "key": attention_layers * m.d_model * kv * hd,
    "value": attention_layers * m.d_model * kv * hd,
    "out": attention_layers * m.num_heads * hd * m.d_model,
    "up": dense_layers * m.d_model * m.mlp_dim,
    "down": dense_layers * m.mlp_dim * m.d_model,
    "output": m.d_model * m.vocab_size,
  }
  if m.mlp == "swiglu":
    counts["gate"] = dense_layers * m.d_model * m.mlp_dim
  if moe_layers:
    expert = 3 * m.d_model * (m.moe_hidden or m.mlp_dim)  # one SwiGLU expert: gate, up, down
    counts["experts"] = moe_layers * m.moe_top_k * expert
    counts["router"] = moe_layers * m.d_model * m.moe_experts
    counts["shared"] = moe_layers * m.moe_shared_experts * expert
  return counts


def matmul_params(model_cfg: config_lib.ModelConfig) -> int:
  """Weights that take part in matrix multiplies, per the convention above, for the model sub-config."""
  return sum(projection_params(model_cfg).values())


def flops_per_token(model_cfg: config_lib.ModelConfig, seq_len: int, trained: str | None = None) -> float:
  """Training FLOPs per token of the model sub-config: 6 per trained matmul weight, 4 per frozen one, plus
  12 * layers * seq_len * attention width (self- and cross-attention layers both count).

  Args:
    model_cfg: the model sub-config.
    seq_len: tokens per row.
    trained: None when every weight trains; else the comma-separated projections whose weight gradient the
      step computes (a LoRA run's `lora.targets`: the gradient of a targeted kernel W + A @ B is taken whole,
      then projected onto A and B), every other weight frozen.

  Returns:
    FLOPs per token.
  """
  m = model_cfg
  attention_width = m.num_heads * config_lib.head_dim(m)
  num_attention_layers = sum(families.get(m.family).attention_layers(m))
  projections = projection_params(m)
  if trained is None:
    trained_params = sum(projections.values())
  else:
    names = {name.strip() for name in trained.split(",")}
    trained_params = sum(count for name, count in projections.items() if name in names)
  return 4 * matmul_params(m) + 2 * trained_params + 12 * num_attention_layers * seq_len * attention_width


def training_flops_per_token(config: config_lib.Config) -> float:
  """`flops_per_token` of what the whole `config` trains: every weight, or a LoRA run's targeted kernels
  only (the merge of the adapters, once per step, is left out: it is not per token)."""
  trained = config.lora.targets if "lora" in config and config.lora.rank > 0 else None
  return flops_per_token(config.model, config.data.seq_len, trained)


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


def peak_cache_path() -> Path:
  """Where measured peaks are cached: $XDG_CACHE_HOME/jaxlm/peak.json (default ~/.cache/jaxlm/peak.json)."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlm" / "peak.json"


def machine_name(device) -> str:
  """What a measured peak belongs to: the CPU model and core count (CPU), or the device kind."""
  if device.platform != "cpu":
    return device.device_kind
  model = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:  # not Linux: platform's name
    pass
  return f"{model}, {os.cpu_count()} cores"


class PeakFlops:
  """What MFU divides by: FLOP/s of all devices together, and a label saying what that figure is.

  TPU and GPU: the chip's published dense bf16 peak (`jaxlm.training.chips.CHIPS`) times the devices, whatever the
  compute dtype, as MaxText reports it. Elsewhere (CPU, or a chip missing from the table): this machine's
  nominal peak, the fastest matmul the step can run (XLA's dot and, when the step's dense layers use it, the BLAS
  kernel of jaxlm/ops/cpu_kernels.py) on a (1024, 1024) product, best of 20, measured once per machine (CPU
  model and cores), dtype and kernels, and cached in `peak_cache_path()`. A fixed figure: measured again at every
  log line on a shared host it moved 3x within one run, and MFU with it. Delete the file to measure again.

  config: the whole config (compute dtype, model sub-config for the dense kernel's choice).
  num_devices: the devices the step runs on.
  """

  _SIZE, _REPEATS = 1024, 20

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
    self.machine = machine_name(device)
    self.key = f"{self.machine}; {jnp.dtype(self.dtype).name}; {', '.join(self.matmuls)}"
    per_host, when = self._cached_or_measured()
    self.flops = self.hosts * per_host
    self.label = (
      f"the nominal peak of {self.hosts} x {self.machine} ({per_host / 1e9:,.4g} GFLOP/s each: the fastest "
      f"{jnp.dtype(self.dtype).name} matmul of {', '.join(self.matmuls)}, measured once on {when} and cached in "
      f"{peak_cache_path()})"
    )

  def _cached_or_measured(self) -> tuple[float, str]:
    """(FLOP/s of one host, the date it was measured): from the cache, else measured now and cached."""
    path, cache = peak_cache_path(), {}
    try:
      cache = json.loads(path.read_text())
      entry = cache[self.key]
      return float(entry["flops"]), str(entry["measured"])
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or another machine's only
      cache = cache if isinstance(cache, dict) else {}
    flops = max(
      measure_matmul_peak(self._SIZE, self.dtype, self._REPEATS, matmul, best=True) for matmul in self.matmuls.values()
    )
    when = datetime.date.today().isoformat()
    cache[self.key] = {"flops": flops, "measured": when}
    try:  # a cache that cannot be written (a read-only home) costs a measurement per run, nothing more
      path.parent.mkdir(parents=True, exist_ok=True)
      partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
      partial.write_text(json.dumps(cache, indent=2) + "\n")
      os.replace(partial, path)  # processes starting together each write a whole file
    except OSError:
      pass
    return flops, when


def format_mfu(mfu: float, peak_flops: float, peak: PeakFlops) -> str:
  """'mfu 53.1% of 45.2 GFLOP/s nominal' (or 'of the published peak'): an MFU never goes out without what it
  is relative to; one above 100% says why it can be."""
  scale, unit = (1e12, "TFLOP/s") if peak_flops >= 1e12 else (1e9, "GFLOP/s")
  text = f"mfu {mfu:.1%} of {peak_flops / scale:,.4g} {unit} " + ("nominal" if peak.measured else "published peak")
  if mfu > 1 and peak.measured:
    text += (
      f" (above 100%: the cached nominal peak was measured under load; delete {peak_cache_path()} to measure again)"
    )
  return text
