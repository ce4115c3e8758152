"""GPT-2 124M (seq 1024) train step: compile time, the persistent cache, and memory per remat policy.

    python benchmarks/compile_memory.py compile   # first-step compile, scan_layers off and on
    python benchmarks/compile_memory.py cache     # cold vs warm start with train.compilation_cache_dir
    python benchmarks/compile_memory.py memory    # peak bytes and step time for each model.remat_policy
    python benchmarks/compile_memory.py speed     # step time per policy, alternating in one process
    python benchmarks/compile_memory.py all [--batch 1] [--steps 2] [--json out.json]

Every case runs in a fresh Python process, so no in-memory cache carries over
between cases. Memory is XLA's own accounting of the compiled step
(`memory_analysis()`): arguments (params, optimizer state, batch), temporaries
(activations kept for the backward pass and scratch), and outputs, which
alias the donated arguments. Float32 compute on CPU; the model is the
`presets.gpt(12, 768, 12)` config of `configs/gpt2_small.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("none", "full", "dots", "dots_no_batch")


def gpt2_small(batch: int, scan_layers: bool, remat_policy: str, cache_dir: str = ""):
  from jaxlm.config import presets

  c = presets.gpt(12, 768, 12)
  c.model.dtype = "float32"
  c.model.scan_layers = scan_layers
  c.model.remat_policy = remat_policy
  c.data.source, c.data.tokenizer, c.data.tokenizer_path = "stdlib", "byte", ""
  c.train.global_batch_size = batch
  c.train.compilation_cache_dir = cache_dir
  return c


def compile_case(case: dict):
  """Builds and compiles the step of one case in this process: (compiled, state, batch, rng, result)."""
  import jax
  import numpy as np

  from jaxlm.parallel import mesh as mesh_lib
  from jaxlm.parallel import sharding
  from jaxlm.training import step as train

  config = gpt2_small(case["batch"], case["scan_layers"], case["remat_policy"], case.get("cache_dir", ""))
  if config.train.compilation_cache_dir:
    # As jaxlm.training.trainer.train does; the thresholds are lowered so the test of the cache is not size-gated.
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
  s = train.setup(config, mesh_lib.make_mesh(config))
  state = train.create_state(s, config.seed)
  step = train.make_train_step(s)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (case["batch"], config.data.seq_len + 1))
  batch = sharding.global_batch(
    {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "segment_ids": np.ones((case["batch"], config.data.seq_len), np.int32),
      "positions": np.tile(np.arange(config.data.seq_len, dtype=np.int32), (case["batch"], 1)),
      "weights": np.ones((case["batch"], config.data.seq_len), np.float32),
    },
    s.batch_sharding,
  )
  rng = jax.random.key(1)
  start = time.perf_counter()
  lowered = step.lower(state, batch, rng)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  memory = compiled.memory_analysis()
  result = {
    **case,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "argument_bytes": memory.argument_size_in_bytes,
    "temp_bytes": memory.temp_size_in_bytes,
    "output_bytes": memory.output_size_in_bytes,
    "alias_bytes": memory.alias_size_in_bytes,
    "code_bytes": memory.generated_code_size_in_bytes,
  }
  # Peak live bytes: inputs + scratch + outputs that do not reuse a donated input.
  result["peak_bytes"] = (
    memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
  )
  return compiled, state, batch, rng, result


def run_case(case: dict) -> dict:
  """One measurement, in this process: build, compile, run `steps` steps."""
  compiled, state, batch, rng, result = compile_case(case)
  times = []
  for _ in range(case["steps"]):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  result["step_s"] = sorted(times)[len(times) // 2] if times else None
  return result


def remat_speed(batch: int, rounds: int) -> dict:
  """Step time of every remat policy, compiled in one process and run in alternating rounds.

  Separate processes run minutes apart, so load from other jobs shifts them
  by more than the policies differ; alternating isolates the policy's cost.
  """
  steps = {
    policy: list(compile_case({"batch": batch, "scan_layers": True, "remat_policy": policy})[:4]) for policy in POLICIES
  }
  times = {policy: [] for policy in POLICIES}
  for r in range(rounds + 1):  # round 0 warms up and is not counted
    for policy in POLICIES if r % 2 else POLICIES[::-1]:
      compiled, state, batch_arrays, rng = steps[policy]
      start = time.perf_counter()
      state, metrics = compiled(state, batch_arrays, rng)
      float(metrics["loss"])
      steps[policy][1] = state
      if r:
        times[policy].append(time.perf_counter() - start)
  return {policy: sorted(t)[len(t) // 2] for policy, t in times.items()}


def spawn(case: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", nargs="?", default="all", choices=("compile", "cache", "memory", "speed", "all"))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=2, help="timed steps per memory case")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the speed case")
  p.add_argument("--json", default="")
  p.add_argument("--case", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.case:
    print(json.dumps(run_case(json.loads(args.case))))
    return
  results = {}
  base = {"batch": args.batch, "steps": 0, "remat_policy": "none"}
  if args.what in ("compile", "all"):
    print("first-step compile time, GPT-2 124M, seq 1024 (lower = trace to HLO; compile = XLA):")
    for scan in (False, True):
      r = spawn({**base, "scan_layers": scan})
      results[f"compile_scan_{scan}"] = r
      print(
        f"  scan_layers={scan!s:5}  lower {r['lower_s']:5.1f} s  compile {r['compile_s']:5.1f} s  "
        f"total {r['lower_s'] + r['compile_s']:5.1f} s",
        flush=True,
      )
  if args.what in ("cache", "all"):
    print("persistent compilation cache (train.compilation_cache_dir), scan_layers=True:")
    with tempfile.TemporaryDirectory() as cache_dir:
      for label in ("cold", "warm"):
        r = spawn({**base, "scan_layers": True, "cache_dir": cache_dir})
        results[f"cache_{label}"] = r
        files = sum(1 for _ in Path(cache_dir).rglob("*") if _.is_file())
        print(
          f"  {label}: lower {r['lower_s']:5.1f} s  compile {r['compile_s']:5.1f} s  ({files} cache files)", flush=True
        )
  if args.what in ("memory", "all"):
    print(f"memory per remat policy, scan_layers=True, batch {args.batch} x 1024 tokens, float32:")
    print(f"  {'policy':14s} {'peak MiB':>9s} {'temp MiB':>9s} {'args MiB':>9s} {'step s':>7s}")
    for policy in POLICIES:
      r = spawn({**base, "steps": args.steps, "scan_layers": True, "remat_policy": policy})
      results[f"memory_{policy}"] = r
      print(
        f"  {policy:14s} {r['peak_bytes'] / 2**20:9.0f} {r['temp_bytes'] / 2**20:9.0f} "
        f"{r['argument_bytes'] / 2**20:9.0f} {r['step_s']:7.2f}",
        flush=True,
      )
  if args.what in ("speed", "all"):
    print(f"step time per remat policy, one process, {args.rounds} alternating rounds (median), batch {args.batch}:")
    results["speed"] = remat_speed(args.batch, args.rounds)
    for policy, seconds in results["speed"].items():
      print(f"  {policy:14s} {seconds:6.2f} s  {seconds / results['speed']['none']:5.2f}x the time of none", flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
