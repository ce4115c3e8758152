"""FLOP counting, MFU, and metric writers (console, JSONL, TensorBoard).

FLOP convention (PaLM, appendix B; also nanoGPT and MaxText): a training
token costs 6 * N_matmul + 12 * num_layers * seq_len * (num_heads * head_dim)
FLOPs, where N_matmul counts every weight that takes part in a matrix
multiply (attention and MLP kernels and the output projection, which is the
tied embedding when embeddings are tied) and not the embedding lookups, norms
or biases. The attention term counts QK^T and AV for forward and backward
without halving for the causal mask. MFU is achieved FLOP/s over peak FLOP/s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import families


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


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Peak FLOP/s of one large `jnp.dot` on the default device, median of `repeats`."""
  a = jnp.ones((n, n), dtype)
  dot = jax.jit(lambda x, y: x @ y)
  dot(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))


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
    from tensorboardX import SummaryWriter  # local: TensorBoard files without TensorFlow
    self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
    self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

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
