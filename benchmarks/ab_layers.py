"""A/B of two versions of jaxlm/models/layers.py: the train step of each, alternating in one process.

    git show HEAD:jaxlm/models/layers.py > /tmp/old_layers.py
    python benchmarks/ab_layers.py /tmp/old_layers.py [--rounds 5] [--config.KEY=VALUE ...]

On a shared machine, load moves absolute step times by 2x. Here both steps are
compiled first, then run in alternating rounds (2 steps each, the order
flipping every round), and the median of the per-round speed-ups is
reported. That isolates a code change far better than two separate runs.
The final losses are printed too: a how-not-what change should match to
float32 rounding.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import torch_peer, train_speed
from jaxlm.models import layers
from jaxlm.models import transformer as model_lib


def load_module(path: str):
  spec = importlib.util.spec_from_file_location("ab_old_layers", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax modules' dataclass transform looks their module up
  spec.loader.exec_module(module)
  return module


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("old_layers", help="path of the other layers.py")
  p.add_argument("--rounds", type=int, default=5)
  args, overrides = p.parse_known_args(argv)
  config = train_speed.reference_config(overrides)
  tokens = torch_peer.random_tokens(train_speed.peer_config(config), np.random.default_rng(0))
  steps = {}
  for name, module in (("old", load_module(args.old_layers)), ("new", layers)):
    model_lib.layers = module  # the model is traced while this is set: compile now
    try:
      runner = train_speed.JaxRunner(config)
      batch = train_speed.jax_batch(tokens, runner.setup.batch_sharding)
      compiled = runner.step.lower(runner.state, batch, runner.rng).compile()
    finally:
      model_lib.layers = layers
    steps[name] = (runner, batch, compiled)

  def run(name) -> float:
    runner, batch, compiled = steps[name]
    runner.state, out = compiled(runner.state, batch, runner.rng)
    return float(out["loss"])

  for name in steps:
    run(name)
  times, speedups = {name: [] for name in steps}, []
  for r in range(args.rounds):
    for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
      start = time.perf_counter()
      run(name), run(name)
      times[name].append((time.perf_counter() - start) / 2)
    speedups.append(times["old"][-1] / times["new"][-1])
    print(
      f"round {r + 1}: old {times['old'][-1] * 1e3:.0f} ms, new {times['new'][-1] * 1e3:.0f} ms, "
      f"speed-up {speedups[-1]:.3f}",
      flush=True,
    )
  print(
    f"median: old {statistics.median(times['old']) * 1e3:.0f} ms, new {statistics.median(times['new']) * 1e3:.0f} ms, "
    f"speed-up {statistics.median(speedups):.3f}; last losses old {run('old'):.7f}, new {run('new'):.7f}"
  )


if __name__ == "__main__":
  main()
