"""Where jaxlm's train step spends its time: a per-op table from a jax.profiler trace.

    python benchmarks/profile_step.py [--steps 3] [--top 25] [--trace-dir /tmp/jaxlm-trace] [--config.KEY=VALUE ...]

Traces a few steps of the real train step on `configs/bench_reference.py`,
then sums the device time of every XLA op (fusion, dot, custom call) and
prints them largest first, with the share of the step. Also times the
forward pass alone (the loss without its gradient), so the backward/forward
ratio is visible. The trace directory opens in TensorBoard/XProf; add
XLA_FLAGS=--xla_dump_to=DIR to see the HLO behind each op name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import torch_peer, train_speed
from jaxlm import runtime
from jaxlm.training import step as train


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the jax op it came from (its op_name metadata), layer index folded away."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
    if m:
      names[m.group(1)] = re.sub(r"layer_\d+", "layer_N", m.group(2)).replace("jit(step_fn)/", "")
  return names


def op_times(trace_dir: str, names: dict[str, str]) -> collections.Counter:
  """Seconds per (thunk kind, jax op) over the XLA CPU thunks in the newest trace under `trace_dir`.

  XLA CPU names each thunk after its HLO instruction (`ynn_fusion.12` is a
  matmul or reduction run by YNNPACK, `dot.3` one run by Eigen, `*_fusion`
  elementwise loops); executor bookkeeping events are left out.
  """
  path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
  totals = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if "XLA" not in line.name:
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          continue
        kind = re.sub(r"[.\d]+$", "", event.name)
        totals[(kind, names.get(event.name, event.name))] += event.duration_ns * 1e-9
  return totals


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace-dir", default="/tmp/jaxlm-trace")
  args, overrides = p.parse_known_args(argv)
  runtime.retain_freed_memory()  # as `jaxlm train` does
  config = train_speed.reference_config(overrides)
  runner = train_speed.JaxRunner(config)
  peer_c = train_speed.peer_config(config)
  tokens = torch_peer.random_tokens(peer_c, np.random.default_rng(0))
  batch = train_speed.jax_batch(tokens, runner.setup.batch_sharding)
  s = runner.setup

  def loss_only(params, batch):
    sums = train.batch_sums(s.model, params, batch, config.train, runner.rng)
    return sums["loss_sum"]

  forward = train.under_mesh(s.mesh, s.rules, jax.jit(loss_only))
  forward(runner.state.params, batch).block_until_ready()
  runner.compile_seconds(batch)

  step_s, forward_s = [], []
  for _ in range(args.steps):
    start = time.perf_counter()
    forward(runner.state.params, batch).block_until_ready()
    forward_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    runner.run(batch)
    step_s.append(time.perf_counter() - start)
  step, fwd = statistics.median(step_s), statistics.median(forward_s)
  print(
    f"train step {step * 1e3:.0f} ms, forward only {fwd * 1e3:.0f} ms, "
    f"so backward + optimizer is {(step - fwd) / fwd:.2f}x the forward (medians of {args.steps})"
  )

  names = op_names(runner.step.lower(runner.state, batch, runner.rng).compile().as_text())
  with jax.profiler.trace(args.trace_dir):
    for _ in range(args.steps):
      runner.run(batch)
  totals = op_times(args.trace_dir, names)
  total = sum(totals.values())
  kinds = collections.Counter()
  for (kind, _), seconds in totals.items():
    kinds[kind] += seconds
  print(f"\nXLA op time {total / args.steps * 1e3:.0f} ms/step (summed over threads); by kind:")
  for kind, seconds in kinds.most_common(8):
    print(f"  {seconds / args.steps * 1e3:8.1f} ms  {seconds / total:6.1%}  {kind}")
  print(f"by jax op (all layers together), top {args.top}:")
  for (kind, op), seconds in totals.most_common(args.top):
    print(f"  {seconds / args.steps * 1e3:8.1f} ms  {seconds / total:6.1%}  {kind:24s} {op}")


if __name__ == "__main__":
  main()
