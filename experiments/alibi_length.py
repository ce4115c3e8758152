"""ALiBi's length extrapolation (Press et al. 2022): train short, test long; configs/alibi_length.py.

Trains the config once per position method, reloads each run with `jaxlm.load`, and scores the same bytes of
jaxlm's own Python files (not in the training corpus) cut into non-overlapping windows of 1x, 2x and 4x the
training length: perplexity per byte over every token of every window. Writes OUT/alibi_length.json and
OUT/alibi_length.png. Each run starts afresh in WORKDIR/<position> (a run there is deleted first).

  python experiments/alibi_length.py [--smoke] [--positions P1,P2] [--steps N] [--workdir runs/alibi_length] [--out docs/img]
"""

import argparse
import glob
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
import optax

import jaxlm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description="Train short, test long: perplexity at 1x, 2x, 4x the training length.")
parser.add_argument("--smoke", action="store_true", help="alibi only, 4 steps, 4 windows: the mechanism")
parser.add_argument("--positions", default="alibi,rope,sinusoidal,learned", help="model.position values, in order")
parser.add_argument("--steps", type=int, help="train.num_steps (default: the config's); a shorter run")
parser.add_argument("--workdir", default="runs/alibi_length")
parser.add_argument("--out", default="docs/img")
args = parser.parse_args()
config = jaxlm.load_config_file("configs/alibi_length.py")
positions, factors, windows = args.positions.split(","), (1, 2, 4), 64  # windows of 4x length
if args.smoke:
  positions, windows, config.train.num_steps, config.train.eval_every = ("alibi",), 4, 4, 4
config.train.num_steps = args.steps or config.train.num_steps
L = config.data.seq_len
held_out = "".join(Path(f).read_text() for f in sorted(glob.glob("jaxlm/**/*.py", recursive=True)))
figure, axis = plt.subplots(figsize=(5.5, 3.8))
results = {"train_length": L, "scored_bytes": windows * 4 * L, "perplexity": {}, "wall_time_s": {}}
for position in positions:
  config.model.position, workdir, started = position, Path(args.workdir) / position, time.perf_counter()
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
  if (summary := jaxlm.train(config, workdir))["stop_reason"] != "finished":  # a signal: stop the experiment too
    sys.exit(f"{workdir}: stopped by {summary['stop_reason']} at step {summary['step']}")
  run = jaxlm.load(workdir)
  ids = run.tokenizer.encode(held_out)[: windows * 4 * L + 1]
  nll = jax.jit(lambda params, x_BxT1: optax.softmax_cross_entropy_with_integer_labels(
    run.model.apply({"params": params}, x_BxT1[:, :-1]), x_BxT1[:, 1:]).mean())  # fmt: skip
  perplexity = {}
  for factor in factors:  # the same bytes in rows of n + 1 tokens that overlap by one (the next row's first input)
    n = factor * L
    rows = [ids[start : start + n + 1] for start in range(0, windows * 4 * L, n)]
    chunks = [rows[i : i + 16] for i in range(0, len(rows), 16)]  # 16 rows at a time bounds the attention memory
    perplexity[f"{factor}x"] = math.exp(sum(float(nll(run.params, np.stack(c))) * len(c) for c in chunks) / len(rows))
  results["perplexity"][position], results["wall_time_s"][position] = perplexity, time.perf_counter() - started
  Path(args.out).mkdir(parents=True, exist_ok=True)  # after each run, so a long experiment can be watched
  (Path(args.out) / "alibi_length.json").write_text(json.dumps(results, indent=1))
  axis.plot([factor * L for factor in factors], list(perplexity.values()), marker="o", label=position)
axis.set(xscale="log", xlabel="tokens (bytes) per evaluation window", ylabel="perplexity per byte")
axis.set_title("Train short, test long (jaxlm: trained on stdlib, scored on jaxlm's sources)", fontsize=9)
axis.axvline(L, color="gray", ls=":")
axis.legend(title=f"trained at {L}")
figure.savefig(Path(args.out) / "alibi_length.png", dpi=80, bbox_inches="tight")
plt.close(figure)
print(json.dumps(results))
