"""jaxlm's train step against a PyTorch peer of the same model, side by side.

    pip install -e '.[bench]' && python benchmarks/train_speed.py

Runs jaxlm's real step (`jaxlm.training.step.setup / create_state / make_train_step`,
the function `jaxlm train` runs) and `benchmarks/torch_peer.py` on the model of
`configs/bench_reference.py`, in alternating rounds within one process, so
both see the same machine load. Each round also re-measures the float32 matmul
peak with both libraries; MFU uses the larger of the two, so neither framework
is flattered by the other's slower BLAS. Quoted figures are medians over
rounds; the ratio is computed per round (jaxlm tok/s over torch tok/s) and its
median reported, which cancels load that drifts between rounds.

Flags: --rounds R --steps K (timed steps per framework per round),
--json PATH, and any --config.KEY=VALUE override for the jaxlm side (the peer
follows model size, sequence length and batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import torch_peer
from jaxlm import config as config_lib
from jaxlm import runtime
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import flops as metrics
from jaxlm.training import step as train


def reference_config(overrides: list[str]):
  config = config_lib.load_config_file(str(ROOT / "configs" / "bench_reference.py"))
  return config_lib.apply_overrides(config, overrides)


def peer_config(config) -> torch_peer.PeerConfig:
  m, o = config.model, config.optim
  return torch_peer.PeerConfig(
    vocab_size=m.vocab_size,
    seq_len=config.data.seq_len,
    num_layers=m.num_layers,
    d_model=m.d_model,
    num_heads=m.num_heads,
    mlp_dim=m.mlp_dim,
    batch_size=config.train.global_batch_size,
    learning_rate=o.learning_rate,
    weight_decay=o.weight_decay,
    clip_norm=o.clip_norm,
  )


def jax_batch(tokens_BxT1: np.ndarray, batch_sharding) -> dict[str, jax.Array]:
  """The peer's random tokens as one unpacked segment per row, in jaxlm's batch format."""
  b, t1 = tokens_BxT1.shape
  t = t1 - 1
  local = {
    "inputs": tokens_BxT1[:, :-1].astype(np.int32),
    "targets": tokens_BxT1[:, 1:].astype(np.int32),
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    "weights": np.ones((b, t), np.float32),
  }
  return sharding.global_batch(local, batch_sharding)


class JaxRunner:
  def __init__(self, config):
    config_lib.validate(config, jax.device_count())
    self.setup = train.setup(config, mesh_lib.make_mesh(config))
    self.state = train.create_state(self.setup, config.seed)
    self.step = train.make_train_step(self.setup)
    self.rng = jax.random.key(config.seed + 1)

  def compile_seconds(self, batch) -> float:
    start = time.perf_counter()
    self.run(batch)
    return time.perf_counter() - start

  def run(self, batch) -> float:
    self.state, step_metrics = self.step(self.state, batch, self.rng)
    return float(step_metrics["loss"])  # waits for the step, like the peer's loss.item()


def timed(fn, batches) -> float:
  """Seconds per step over `batches`."""
  start = time.perf_counter()
  for batch in batches:
    fn(batch)
  return (time.perf_counter() - start) / len(batches)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="timed steps per framework per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework before round 1")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument(
    "--default-malloc",
    action="store_true",
    help="skip runtime.retain_freed_memory(), which `jaxlm train` calls (it applies to both sides)",
  )
  args, overrides = p.parse_known_args(argv)
  retained = False if args.default_malloc else runtime.retain_freed_memory()
  config = reference_config(overrides)
  peer_c = peer_config(config)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  flops_per_token = metrics.flops_per_token(config.model, config.data.seq_len)
  if abs(torch_peer.flops_per_token(peer_c) - flops_per_token) > 1e-6 * flops_per_token:
    raise SystemExit(f"FLOP counts disagree: jaxlm {flops_per_token} vs peer {torch_peer.flops_per_token(peer_c)}")

  rng = np.random.default_rng(0)
  token_batches = [torch_peer.random_tokens(peer_c, rng) for _ in range(args.steps)]
  jaxlm_runner = JaxRunner(config)
  peer = torch_peer.TorchPeer(peer_c, seed=0)
  jax_batches = [jax_batch(t, jaxlm_runner.setup.batch_sharding) for t in token_batches]

  compile_s = jaxlm_runner.compile_seconds(jax_batches[0])
  first_losses = {"jaxlm": jaxlm_runner.run(jax_batches[0]), "torch": peer.train_step(token_batches[0])}
  for i in range(args.warmup):
    jaxlm_runner.run(jax_batches[i % len(jax_batches)])
    peer.train_step(token_batches[i % len(token_batches)])

  rounds = []
  for r in range(args.rounds):
    # Alternate which goes first so neither always runs right after the peak measurement.
    order = ("jaxlm", "torch") if r % 2 == 0 else ("torch", "jaxlm")
    seconds = {}
    for name in order:
      fn, batches = (jaxlm_runner.run, jax_batches) if name == "jaxlm" else (peer.train_step, token_batches)
      seconds[name] = timed(fn, batches)
    peak = max(metrics.measure_matmul_peak(), torch_peer.matmul_peak_flops(repeats=5))
    row = {
      "peak_flops": peak,
      **{f"{k}_step_s": v for k, v in seconds.items()},
      "ratio": seconds["torch"] / seconds["jaxlm"],
    }
    rounds.append(row)
    print(
      f"round {r + 1}/{args.rounds}: jaxlm {tokens_per_step / seconds['jaxlm']:,.0f} tok/s, "
      f"torch {tokens_per_step / seconds['torch']:,.0f} tok/s, ratio {row['ratio']:.3f}, "
      f"peak {peak / 1e9:.0f} GFLOP/s",
      flush=True,
    )

  median = lambda key: statistics.median(row[key] for row in rounds)
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "jax_version": jax.__version__,
    "torch_version": torch_peer.torch.__version__,
    "rounds": args.rounds,
    "steps_per_round": args.steps,
    "tokens_per_step": tokens_per_step,
    "flops_per_token": flops_per_token,
    "jaxlm_compile_s": compile_s,
    "retain_freed_memory": retained,
    "first_step_loss": first_losses,
    "peak_flops": median("peak_flops"),
    "ratio": median("ratio"),
  }
  for name in ("jaxlm", "torch"):
    tok_s = [tokens_per_step / row[f"{name}_step_s"] for row in rounds]
    mfu = [tokens_per_step / row[f"{name}_step_s"] * flops_per_token / row["peak_flops"] for row in rounds]
    result[name] = {
      "tokens_per_s": statistics.median(tok_s),
      "mfu": statistics.median(mfu),
      "step_ms": 1e3 * median(f"{name}_step_s"),
    }
  print(
    f"\nreference config, {result['cpu_count']} CPUs, jax {result['jax_version']}, "
    f"torch {result['torch_version']}, "
    f"medians of {args.rounds} rounds x {args.steps} steps; matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s; "
    f"retain_freed_memory {retained}"
  )
  for name in ("jaxlm", "torch"):
    r = result[name]
    print(
      f"  {name:6s} {r['tokens_per_s']:8,.0f} tok/s  {r['step_ms']:7.1f} ms/step  MFU {r['mfu']:.1%}  "
      f"first loss {first_losses[name]:.4f}"
    )
  print(f"  ratio jaxlm/torch (median of per-round ratios): {result['ratio']:.3f}")
  print(f"  jaxlm first step (compile + run): {compile_s:.1f} s")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
