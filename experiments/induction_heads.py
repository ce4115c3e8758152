"""Induction heads (Olsson et al. 2022) in attention-only models: configs/induction_heads.py.

Trains a `jaxlm.DecoderLM` whose block has no MLP, with two layers and then with one (Olsson et al.'s control),
on ready batches of repeated random byte strings: each row is a random string of 8-64 bytes repeated to fill the
row, so a token can be predicted only by finding its earlier occurrence. A Callback measures, every
`train.log_every` steps, with `jaxlm.attention_weights` on held-out repeated strings of 64 bytes:
- the prefix-matching score of each head of the last layer: the attention a token of the repeat pays to the
  token after its earlier occurrence;
- the previous-token score of each head of the first layer: the attention a token pays to the one before it;
- the loss on the repeat (the second 64 bytes), and the in-context score on text: the mean loss at tokens
  112-127 minus tokens 12-27 (Olsson et al.'s "token 500 minus token 50", scaled to 128-byte rows) on jaxlm's
  own Python files, which the model never trains on.
Writes OUT/induction_heads.json and OUT/induction_heads.png. Each run starts afresh in WORKDIR/layers_N.

  python experiments/induction_heads.py [--smoke] [--steps N] [--workdir runs/induction_heads] [--out docs/img]
"""

import argparse
import glob
import json
import shutil
import time
from pathlib import Path

import flax.linen as nn
import jax
import matplotlib
import numpy as np
import optax

import jaxlm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description="Induction heads in attention-only models, two layers and one.")
parser.add_argument("--smoke", action="store_true", help="10 steps, 8 rows: the mechanism, in seconds")
parser.add_argument("--steps", type=int, help="train.num_steps (default: the config's); a shorter run")
parser.add_argument("--workdir", default="runs/induction_heads")
parser.add_argument("--out", default="docs/img")
args = parser.parse_args()
config = jaxlm.load_config_file("configs/induction_heads.py")
if args.smoke:
  config.train.num_steps, config.train.log_every, config.train.eval_every = 10, 5, 10
config.train.num_steps = args.steps or config.train.num_steps
T, B, rows, out = config.data.seq_len, config.train.global_batch_size, 8 if args.smoke else 64, Path(args.out)
text = "".join(Path(path).read_text() for path in sorted(glob.glob("jaxlm/**/*.py", recursive=True)))
probe_BxT = np.tile(np.random.default_rng(1).integers(0, 256, (rows, T // 2)), 2)  # held-out: period T/2


def repeated_strings(rng=np.random.default_rng(config.seed)):  # bytes 0-255 are ids 4-259 (ByteTokenizer)
  while True:
    ids_BxT1 = np.stack([np.resize(rng.integers(0, 256, period), T + 1) for period in rng.integers(8, 65, B)]) + 4
    ones_BxT = np.ones((B, T), np.int32)
    yield {"inputs": ids_BxT1[:, :-1], "targets": ids_BxT1[:, 1:], "weights": ones_BxT.astype(np.float32),
           "segment_ids": ones_BxT, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}  # fmt: skip


class AttentionOnly(jaxlm.Block):  # x + attention(norm(x)): no MLP
  @nn.compact
  def __call__(self, x_BxTxD, mask, positions_BxT, *unused):
    return x_BxTxD + self.self_attention()(jaxlm.Norm(self.cfg, name="norm")(x_BxTxD), mask, positions_BxT)


class Scores(jaxlm.Callback):
  def __init__(self, curve):
    self.curve = curve

  def on_start(self, trainer, step):
    text_BxT1, repeated_BxT = trainer.tokenizer.encode(text)[: rows * (T + 1)].reshape(rows, T + 1), probe_BxT + 4

    def measure(params):
      nll = lambda x_BxT1: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        trainer.model.apply({"params": params}, x_BxT1[:, :-1]), x_BxT1[:, 1:]).mean(0)  # fmt: skip
      weights = jaxlm.attention_weights(trainer.model, params, repeated_BxT)  # per layer: B x N x T x S
      query_T, text_T = np.arange(T // 2, T), nll(text_BxT1)
      prefix_N = weights[-1][:, :, query_T, query_T - T // 2 + 1].mean((0, 2))
      previous_N = weights[0][:, :, np.arange(1, T), np.arange(T - 1)].mean((0, 2))
      in_context = text_T[T - 16 :].mean() - text_T[12:28].mean()
      return in_context, nll(repeated_BxT)[T // 2 :].mean(), prefix_N, previous_N, weights[-1][0]

    self.measure = jax.jit(measure)

  def on_step(self, trainer, step, metrics):
    in_context, repeat_loss, prefix_N, previous_N, self.pattern = self.measure(trainer.state.params)
    self.curve.append({"step": step, "loss": metrics["loss"], "in_context_score": float(in_context),
                       "repeat_loss": float(repeat_loss), "prefix_matching": prefix_N.tolist(),
                       "previous_token": previous_N.tolist()})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # at every log line, so a long run can be watched
    (out / "induction_heads.json").write_text(json.dumps(results, indent=1))


results, patterns = {"train_length": T, "period": [8, 64]}, {}
for layers in (2, 1):
  config.model.num_layers, workdir, started = layers, Path(args.workdir) / f"layers_{layers}", time.perf_counter()
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
  run = results[f"layers_{layers}"] = {"curve": []}
  model, scores = jaxlm.DecoderLM(config.model, deterministic=False, block_cls=AttentionOnly), Scores(run["curve"])
  summary = jaxlm.train(config, workdir, model=model, train_data=repeated_strings(), callbacks=[scores])
  patterns[layers], best = scores.pattern, [max(row["prefix_matching"]) for row in run["curve"]]
  run.update(wall_time_s=time.perf_counter() - started, step_time_s=summary.get("step_time_s"),
             prefix_matching_above_0_5=next((r["step"] for r, b in zip(run["curve"], best) if b > 0.5), None))  # fmt: skip
figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for layers, style in ((2, "-"), (1, "--")):
  curve = results[f"layers_{layers}"]["curve"]
  steps, label = [row["step"] for row in curve], f"{layers} layer{'s' * (layers > 1)}"
  axes[0].plot(steps, [row["in_context_score"] for row in curve], style, color="tab:blue", label=f"{label}: text")
  axes[0].plot(steps, [row["repeat_loss"] for row in curve], style, color="tab:red", label=f"{label}: repeat loss")
  axes[1].plot(
    steps, [max(row["prefix_matching"]) for row in curve], style, color="tab:orange", label=f"{label}: prefix"
  )
  axes[1].plot(
    steps, [max(row["previous_token"]) for row in curve], style, color="tab:green", label=f"{label}: previous"
  )
axes[0].set(xlabel="step (32 x 128 bytes)", ylabel="nats", title="in-context score (text), loss on a repeat")
axes[1].set(xlabel="step", ylim=(0, 1), title="best head's score")
head = int(np.argmax(results["layers_2"]["curve"][-1]["prefix_matching"]))
axes[2].imshow(np.asarray(patterns[2][head]), cmap="viridis")
axes[2].set(title=f"2 layers: layer 2, head {head}", xlabel="key", ylabel="query")
for axis in axes[:2]:
  axis.legend(fontsize=7)
figure.savefig(out / "induction_heads.png", dpi=80, bbox_inches="tight")
plt.close(figure)
(out / "induction_heads.json").write_text(json.dumps(results, indent=1))
print(json.dumps({name: {k: v for k, v in run.items() if k != "curve"} | {"last": run["curve"][-1]}
                  for name, run in results.items() if isinstance(run, dict)}))  # fmt: skip
