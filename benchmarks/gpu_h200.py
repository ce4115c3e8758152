"""Train-step MFU on one GPU (H200) across models, attention implementations, remat policies and batch sizes.

    python benchmarks/gpu_h200.py [--json gpu_h200.json] [--models gpt2 llama1b] [--impls cudnn triton xla]
        [--remat none dots_no_batch full] [--steps 10] [--max-minutes 12]
    python benchmarks/gpu_h200.py --smoke     # tiny model on CPU: checks the script, measures nothing

Models: GPT-2 124M at sequence length 1024 (batches 16, 32, 64) and a
1.1B LLaMA-shaped model (TinyLlama's shape: 22 layers, d_model 2048, 32
heads with 4 key/value heads, SwiGLU 5632, RoPE; sequence 2048, batches 4,
8, 16). Attention: cuDNN's fused kernel, the Pallas/Triton flash kernel
(jaxlm/ops/pallas_attention.py, with segment ids) and XLA's own code.

Installs nothing: it needs the jax (with CUDA) that the machine has
(`pip install -e '.[cuda12]'`), and this repository on the path;
benchmarks/gpu_check.sh installs both on a fresh GPU machine and runs this
script among its checks. bfloat16 compute with float32 master weights
(model.dtype=bfloat16, param_dtype=float32), scanned layers, AdamW, through
jaxlm's real train step. MFU counts 6 N_matmul + attention FLOPs per token
(jaxlm.training.flops.flops_per_token) against the bfloat16 dense matmul peak
measured in the same run (jaxlm.training.flops.measure_matmul_peak); `mfu_published`
divides by the chip's published peak instead (jaxlm.training.chips, what the
trainer's MFU and `jaxlm devices` use), where the table knows the chip.
Each configuration's result (or its error, e.g. out of memory) is
printed and written to the JSON file as soon as it is done, so a run cut
short still reports what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlm import runtime
from jaxlm.config import presets
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import chips
from jaxlm.training import flops as metrics
from jaxlm.training import step as train

BATCHES = {"gpt2": (16, 32, 64), "llama1b": (4, 8, 16)}


def model_config(model: str, impl: str, remat: str, batch: int, smoke: bool):
  if smoke:
    c = presets.gpt(2, 64, 4, context=128)
  elif model == "gpt2":
    c = presets.gpt(12, 768, 12)
  else:
    c = presets.llama(num_layers=22, d_model=2048, num_heads=32, mlp_dim=5632)
    c.model.num_kv_heads = 4
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = remat
  c.model.attention_impl = impl
  c.data.source, c.data.tokenizer, c.data.tokenizer_path = "stdlib", "byte", ""
  c.train.global_batch_size = batch
  c.optim.warmup_steps = 0
  return c


def measure(config, steps: int) -> dict:
  s = train.setup(config, mesh_lib.make_mesh(config))
  state = train.create_state(s, config.seed)
  step = train.make_train_step(s)
  b, t = config.train.global_batch_size, config.data.seq_len
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (b, t + 1))
  batch = sharding.global_batch(
    {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      "weights": np.ones((b, t), np.float32),
    },
    s.batch_sharding,
  )
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  for _ in range(2):  # warm-up: allocator and autotuning settle
    state, out = compiled(state, batch, rng)
  float(out["loss"])
  times = []
  for _ in range(3):  # three timed blocks of `steps` steps; dispatch runs ahead within a block
    start = time.perf_counter()
    for _ in range(steps):
      state, out = compiled(state, batch, rng)
    loss = float(out["loss"])
    times.append((time.perf_counter() - start) / steps)
  step_s = statistics.median(times)
  return {
    "compile_s": compile_s,
    "step_ms": 1e3 * step_s,
    "tokens_per_s": b * t / step_s,
    "loss": loss,
    "temp_gib": memory.temp_size_in_bytes / 2**30 if memory else None,
    "argument_gib": memory.argument_size_in_bytes / 2**30 if memory else None,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", nargs="+", default=["gpt2", "llama1b"], choices=list(BATCHES))
  p.add_argument("--impls", nargs="+", default=["cudnn", "triton", "xla"])
  p.add_argument("--remat", nargs="+", default=["none", "dots_no_batch", "full"])
  p.add_argument("--batches", nargs="+", type=int, default=None, help="default: per model (BATCHES)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--max-minutes", type=float, default=12.0, help="start no new configuration after this")
  p.add_argument("--json", default="gpu_h200.json")
  p.add_argument("--smoke", action="store_true", help="tiny model on CPU; triton runs in Pallas interpret mode")
  args = p.parse_args(argv)
  runtime.skip_tpu_backend_without_tpu()  # as `jaxlm` does: an installed libtpu stays quiet on a GPU or CPU host
  if args.smoke:
    args.models, args.impls, args.remat, args.batches, args.steps = (
      ["gpt2"],
      ["xla", "triton"],
      ["none", "full"],
      [2],
      2,
    )
  began = time.perf_counter()
  device = jax.devices()[0]
  peak = metrics.measure_matmul_peak(n=512 if args.smoke else 8192, dtype=jnp.bfloat16, repeats=10)
  chip = chips.chip_for_device_kind(device.device_kind)
  published = chips.CHIPS[chip].peak_flops if chip else None
  report = {
    "date": time.strftime("%Y-%m-%d"),
    "device": device.device_kind,
    "platform": device.platform,
    "jax": jax.__version__,
    "smoke": args.smoke,
    "bf16_matmul_peak_tflops": peak / 1e12,
    "published_peak_tflops": published / 1e12 if published else None,
    "results": [],
  }
  print(
    f"{device.device_kind} ({device.platform}); measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s, published "
    + (f"{published / 1e12:,.0f} TFLOP/s" if published else "unknown (not in jaxlm/training/chips.py)")
  )
  print(
    f"{'model':8s} {'attention':9s} {'remat':14s} {'batch':>5s} {'tok/s':>10s} {'ms/step':>8s} {'MFU':>6s} "
    f"{'temp GiB':>8s} {'compile s':>9s}"
  )
  cases = [
    (model, impl, remat, batch)
    for model in args.models
    for impl, remat, batch in itertools.product(args.impls, args.remat, args.batches or BATCHES[model])
  ]
  for model, impl, remat, batch in cases:
    if time.perf_counter() - began > 60 * args.max_minutes:
      print(f"stopping: --max-minutes {args.max_minutes} reached")
      break
    config = model_config(model, impl, remat, batch, args.smoke)
    row = {
      "model": model,
      "attention_impl": impl,
      "remat_policy": remat,
      "batch": batch,
      "seq_len": config.data.seq_len,
    }
    try:
      row.update(measure(config, args.steps))
      achieved = row["tokens_per_s"] * metrics.flops_per_token(config.model, config.data.seq_len)
      row["mfu"] = achieved / peak
      row["mfu_published"] = achieved / published if published else None
      print(
        f"{model:8s} {impl:9s} {remat:14s} {batch:5d} {row['tokens_per_s']:10,.0f} {row['step_ms']:8.1f} "
        f"{row['mfu']:6.1%} {row['temp_gib'] or 0:8.2f} {row['compile_s']:9.1f}",
        flush=True,
      )
    except Exception as e:  # one failing configuration (OOM, unsupported cuDNN case) must not end the sweep
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      print(f"{model:8s} {impl:9s} {remat:14s} {batch:5d} failed: {row['error']}", flush=True)
      traceback.print_exc(limit=2)
    report["results"].append(row)
    Path(args.json).write_text(json.dumps(report, indent=2))
  for model in args.models:
    ok = [r for r in report["results"] if "mfu" in r and r["model"] == model]
    if ok:
      best = max(ok, key=lambda r: r["mfu"])
      print(
        f"best {model}: {best['attention_impl']} attention, remat {best['remat_policy']}, batch {best['batch']}: "
        f"MFU {best['mfu']:.1%} ({best['tokens_per_s']:,.0f} tok/s); results in {args.json}"
      )


if __name__ == "__main__":
  main()
