"""Induction heads (Olsson et al. 2022) in a two-layer attention-only model: configs/induction_heads.py.

Trains a `jaxlm.DecoderLM` whose block has no MLP on the config's corpus. A Callback measures, every
`train.log_every` steps: the in-context score (mean loss at tokens 240-255 minus at tokens 20-35 of 256-byte rows
of jaxlm's own Python files, which are not in the training corpus) and each layer-2 head's prefix-matching score:
on a random printable string repeated twice, the attention a token of the repeat pays to the token after its
earlier occurrence (`jaxlm.attention_weights`). Writes OUT/induction_heads.json and OUT/induction_heads.png.
The run starts afresh in WORKDIR (a run there is deleted first).

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

parser = argparse.ArgumentParser(description="Induction heads in a two-layer attention-only model.")
parser.add_argument("--smoke", action="store_true", help="10 steps, 8 rows: the mechanism, in seconds")
parser.add_argument("--steps", type=int, help="train.num_steps (default: the config's); a shorter run")
parser.add_argument("--workdir", default="runs/induction_heads")
parser.add_argument("--out", default="docs/img")
args = parser.parse_args()
config = jaxlm.load_config_file("configs/induction_heads.py")
if args.smoke:
  config.train.num_steps, config.train.log_every, config.train.eval_every = 10, 5, 10
config.train.num_steps = args.steps or config.train.num_steps
T, rows = config.data.seq_len, 8 if args.smoke else 64
held_out = "".join(Path(path).read_text() for path in sorted(glob.glob("jaxlm/**/*.py", recursive=True)))
strings = np.random.default_rng(0).integers(32, 127, (rows, T // 2), np.uint8)  # printable bytes


class AttentionOnly(jaxlm.Block):  # x + attention(norm(x)): no MLP
  @nn.compact
  def __call__(self, x_BxTxD, mask, positions_BxT, *unused):
    return x_BxTxD + self.self_attention()(jaxlm.Norm(self.cfg, name="norm")(x_BxTxD), mask, positions_BxT)


class Scores(jaxlm.Callback):
  def on_start(self, trainer, step):
    self.text_BxT1 = trainer.tokenizer.encode(held_out)[: rows * (T + 1)].reshape(rows, T + 1)
    self.repeated_BxT = np.stack([np.tile(trainer.tokenizer.encode(s.tobytes()), 2) for s in strings])

    def measure(params):
      logits_BxTxV = trainer.model.apply({"params": params}, self.text_BxT1[:, :-1])
      loss_T = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, self.text_BxT1[:, 1:]).mean(0)
      weights_BxNxTxS = jaxlm.attention_weights(trainer.model, params, self.repeated_BxT)[1]  # layer 2
      query_T = np.arange(T // 2, T)  # each token of the repeat, and the token after its first occurrence
      prefix_N = weights_BxNxTxS[:, :, query_T, query_T - T // 2 + 1].mean((0, 2))
      return loss_T[240:256].mean() - loss_T[20:36].mean(), prefix_N, weights_BxNxTxS[0]

    self.measure = jax.jit(measure)

  def on_step(self, trainer, step, metrics):
    in_context, prefix_N, self.pattern = self.measure(trainer.state.params)
    results["curve"].append({"step": step, "loss": metrics["loss"], "in_context_score": float(in_context),
                             "prefix_matching": [float(x) for x in prefix_N]})  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)  # at every log line, so a long run can be watched
    (Path(args.out) / "induction_heads.json").write_text(json.dumps(results, indent=1))


shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh run, not a resume
results, scores, started = {"curve": []}, Scores(), time.perf_counter()
model = jaxlm.DecoderLM(config.model, deterministic=False, block_cls=AttentionOnly)
summary = jaxlm.train(config, args.workdir, model=model, callbacks=[scores])
curve, head = results["curve"], int(np.argmax(results["curve"][-1]["prefix_matching"]))
results.update(wall_time_s=time.perf_counter() - started, step_time_s=summary.get("step_time_s"),
               final_val_loss=summary.get("final_val_loss"), best_head_layer_2=head)  # fmt: skip
steps, best = [r["step"] for r in curve], [max(r["prefix_matching"]) for r in curve]
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
left.plot(steps, [r["in_context_score"] for r in curve], color="tab:blue")
left.set(xlabel="step (16 x 256 bytes)", ylabel="in-context score (nats)", title="loss(token 240-255) - loss(20-35)")
twin = left.twinx()
twin.plot(steps, best, color="tab:orange")
twin.set(ylabel="best layer-2 prefix-matching score", ylim=(0, 1))
right.imshow(np.asarray(scores.pattern[head]), cmap="viridis")
right.set(title=f"layer 2, head {head}: a repeated random string", xlabel="key", ylabel="query")
figure.savefig(Path(args.out) / "induction_heads.png", dpi=80, bbox_inches="tight")
plt.close(figure)
(Path(args.out) / "induction_heads.json").write_text(json.dumps(results, indent=1))
print(json.dumps({k: v for k, v in results.items() if k != "curve"} | {"last": curve[-1]}))
