"""LoRA against full fine-tuning on a LLaMA-shaped model: trainable parameters, optimizer state, step time.

    python benchmarks/lora_speed.py [--layers 4] [--d-model 256] [--steps 20] [--rank 8]

The model is `presets.llama` shrunk to run on a CPU (RMSNorm, RoPE, SwiGLU, no biases, untied
embeddings; byte vocabulary). Both cases build the trainer's own step (`train_step.setup` and
`make_train_step`): full fine-tuning with the family model, LoRA with `lora.AdaptedModel` over the same
base parameters (targets query,value, then every projection). Step time is the median of `--steps`
steps after compilation, on one device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import numpy as np

from jaxlm.config import presets
from jaxlm.models import lora
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import step as train_step


def config_for(args):
  """The whole config of the benchmark's LLaMA-shaped model."""
  c = presets.llama(
    num_layers=args.layers, d_model=args.d_model, num_heads=args.d_model // 64, mlp_dim=args.d_model * 8 // 3 // 8 * 8
  )
  c.data.source, c.data.tokenizer, c.data.tokenizer_path = "stdlib", "byte", ""
  c.model.vocab_size, c.model.max_len, c.data.seq_len = 260, args.seq_len, args.seq_len
  c.train.global_batch_size, c.train.num_steps = args.batch, 1000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  c.model.dtype = c.model.param_dtype = "float32"
  c.lora.rank, c.lora.alpha = args.rank, 2.0 * args.rank
  return c


def nbytes(tree) -> int:
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def measure(config, mesh, model, steps: int) -> dict:
  """Trainable parameters, optimizer-state bytes and median step time of one setup."""
  s = train_step.setup(config, mesh, model)
  state = train_step.create_state(s, 0)
  step_fn = train_step.make_train_step(s)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (config.train.global_batch_size, config.data.seq_len + 1), dtype=np.int32)
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones(tokens[:, 1:].shape, np.float32),
    "segment_ids": np.ones(tokens[:, 1:].shape, np.int32),
    "positions": np.broadcast_to(np.arange(config.data.seq_len, dtype=np.int32), tokens[:, 1:].shape),
  }
  batch = sharding.global_batch(batch, s.batch_sharding)
  key = jax.random.key(1)
  state, metrics = step_fn(state, batch, key)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {
    "trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params)),
    "opt_bytes": nbytes(s.abstract_state.opt_state),
    "step_s": statistics.median(times),
    "state": state,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args(argv)
  config = config_for(args)
  mesh = mesh_lib.make_mesh(config)
  full = measure(config, mesh, None, args.steps)
  base = full.pop("state").params
  rows = [("full fine-tuning", full)]
  for targets in ("query,value", "query,key,value,out,up,gate,down"):
    config.lora.targets = targets
    result = measure(config, mesh, lora.adapted_model(config, base), args.steps)
    result.pop("state")
    rows.append((f"LoRA r={args.rank} on {targets}", result))
  print(
    f"LLaMA-shaped: {args.layers} layers, d_model {args.d_model}, mlp {config.model.mlp_dim}, "
    f"batch {args.batch} x {args.seq_len}, {full['trainable']:,} parameters, float32, AdamW"
  )
  print("| run | trainable parameters | optimizer state | step time (median) |")
  print("|---|---|---|---|")
  for name, r in rows:
    print(
      f"| {name} | {r['trainable']:,} ({100 * r['trainable'] / full['trainable']:.2f}%) | "
      f"{r['opt_bytes'] / 2**20:.2f} MiB | {1000 * r['step_s']:.0f} ms |"
    )


if __name__ == "__main__":
  main()
