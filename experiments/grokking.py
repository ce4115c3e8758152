"""Grokking (Power et al. 2022) on modular addition: configs/grokking.py, Nanda et al.'s (2023) model and optimizer.

Trains the config twice, with weight decay 1.0 and 0.0, full batch on the same training pairs "a b =" -> (a + b)
mod p (the first `train.global_batch_size` of all p^2 pairs, shuffled; the rest, exactly the held-out pairs, are
the test set), the loss on the answer (at '=') only. A Callback measures train and test accuracy and loss at the
answer every `train.log_every` steps. Writes OUT/grokking.json (the curves, and the first step at which each
accuracy passes 0.95 and 0.99) and OUT/grokking.png. Each run starts afresh in WORKDIR/weight_decay_<value>.

  python experiments/grokking.py [--smoke] [--steps N] [--train-pairs N] [--workdir runs/grokking] [--out docs/img]
"""

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import jax
import matplotlib
import numpy as np
import optax

import jaxlm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description="Grokking on modular addition (configs/grokking.py).")
parser.add_argument("--smoke", action="store_true", help="p = 23, a 60%% split, 80 steps: the mechanism, in seconds")
parser.add_argument("--steps", type=int, help="train.num_steps (default: the config's); a shorter run")
parser.add_argument("--train-pairs", type=int, help="train.global_batch_size: the training fraction (a multiple of 8)")
parser.add_argument("--workdir", default="runs/grokking")
parser.add_argument("--out", default="docs/img")
args = parser.parse_args()
config = jaxlm.load_config_file("configs/grokking.py")
if args.smoke:  # p = 23, 320 of the 529 pairs for training
  config.model.vocab_size, config.train.global_batch_size, config.train.log_every = 24, 320, 10
config.train.num_steps = args.steps or (80 if args.smoke else config.train.num_steps)
config.train.global_batch_size = args.train_pairs or config.train.global_batch_size
n_train, p = config.train.global_batch_size, config.model.vocab_size - 1  # ids 0..p-1: residues; p: '='
pairs = np.random.default_rng(config.seed).permutation(np.array([(a, b) for a in range(p) for b in range(p)], np.int32))


def batch(ab):  # "a b =" -> (a + b) mod p, scored at '=' only
  equals, ones = np.full(len(ab), p, np.int32), np.ones((len(ab), 3), np.int32)
  inputs, targets = np.stack([ab[:, 0], ab[:, 1], equals], 1), np.stack([ab[:, 1], equals, ab.sum(1) % p], 1)
  return {"inputs": inputs, "targets": targets, "segment_ids": ones, "positions": ones.cumsum(1) - 1,
          "weights": ones * np.float32([0, 0, 1])}  # fmt: skip


splits = {"train": batch(pairs[:n_train]), "test": batch(pairs[n_train:])}
results, out = {"p": p, "train_pairs": n_train, "test_pairs": len(pairs) - n_train}, Path(args.out)


class Accuracy(jaxlm.Callback):  # accuracy and loss at '=' on both splits, with the model being trained
  def __init__(self, rows):
    self.rows = rows

  def on_start(self, trainer, step):  # jitted on the host's batch: the test split need not divide over the devices
    def measure(params, b):
      logits_BxV, answers_B = trainer.model.apply({"params": params}, b["inputs"])[:, -1], b["targets"][:, -1]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxV, answers_B).mean()
      return {"acc": (logits_BxV.argmax(-1) == answers_B).mean(), "loss": loss}

    self.measure = jax.jit(measure)

  def on_step(self, trainer, step, metrics):
    self.rows.append({"step": step})
    for split, b in splits.items():
      self.rows[-1].update({f"{split}_{k}": float(v) for k, v in self.measure(trainer.state.params, b).items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "grokking.json").write_text(json.dumps(results, indent=1))  # at every log line: a long run can be watched


figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for weight_decay, color in ((1.0, "tab:blue"), (0.0, "tab:red")):
  config.optim.weight_decay, workdir = weight_decay, Path(args.workdir) / f"weight_decay_{weight_decay}"
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
  rows, started = [], time.perf_counter()
  run = results[f"weight_decay_{weight_decay}"] = {"curve": rows}  # in the JSON as it grows
  summary = jaxlm.train(config, workdir, train_data=itertools.repeat(splits["train"]), callbacks=[Accuracy(rows)])
  run.update(wall_time_s=time.perf_counter() - started, step_time_s=summary.get("step_time_s"))
  run.update(stop_reason=summary["stop_reason"])
  for key, level in (("train_acc", 0.99), ("test_acc", 0.95), ("test_acc", 0.99)):  # each transition's first step
    run[f"{key}_above_{level}"] = next((row["step"] for row in rows if row[key] > level), None)
  for (axis, metric), (split, style) in itertools.product(zip(axes, ("acc", "loss")), (("train", "-"), ("test", "--"))):
    label = f"{split}, weight decay {weight_decay:g}"
    axis.plot(
      [row["step"] for row in rows], [row[f"{split}_{metric}"] for row in rows], style, color=color, label=label
    )
axes[0].set(xlabel="full-batch step", ylabel="accuracy at '='")
axes[1].set(yscale="log", xlabel="full-batch step", ylabel="loss at '=' (nats)")
axes[0].legend(fontsize=8)
(out / "grokking.json").write_text(json.dumps(results, indent=1))
figure.suptitle(f"Grokking: (a + b) mod {p}, {n_train} of {len(pairs)} pairs for training, full batch (jaxlm)")
figure.savefig(out / "grokking.png", dpi=80, bbox_inches="tight")
print({name: {k: v for k, v in run.items() if k != "curve"} for name, run in results.items() if isinstance(run, dict)})
