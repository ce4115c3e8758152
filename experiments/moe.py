"""A tiny MoE against the dense model with the same active parameters, on the default corpus (docs/moe.md).

    nice -n 10 python experiments/moe.py --out runs/moe [--steps 120] [--variants dense,moe,capacity]
        [--config.KEY=VALUE ...]   (given to every variant)

Trains each variant of configs/moe_tiny.py for the same steps, one after another, each a normal jaxlm run in
OUT/VARIANT:
  dense     one SwiGLU MLP of mlp_dim 768 per layer (moe_experts=0);
  moe       8 SwiGLU experts of 384, top-2, dropless dispatch;
  capacity  the same MoE with capacity dispatch (factor 1.25): the choices past an expert's slots are dropped.
The dense MLP and two experts have the same weights per token, so equal steps are equal training FLOPs up to
the router (`jaxlm.training.flops.flops_per_token`, which counts active weights, gives each variant's figure):
the plot's second panel puts validation loss against those FLOPs, the third against wall time on this machine.
Then each MoE run's final parameters route the validation batches again, and the load of every expert in
every layer (its fraction of the routed choices; 1/8 each when balanced) and the dropped fraction are
measured. Each variant's row goes to OUT/VARIANT/experiment.json; OUT/results.json and OUT/moe.png are
rebuilt from every variant finished in OUT, so variants may also run as separate processes (--variants moe).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import loader
from jaxlm.data import feed
from jaxlm.models import transformer as model_lib
from jaxlm.training import flops, plot, trainer

CONFIG = ROOT / "configs" / "moe_tiny.py"
VARIANTS = {
  "dense": ["--config.model.moe_experts=0"],
  "moe": ["--config.model.moe_dispatch=dropless"],
  "capacity": ["--config.model.moe_dispatch=capacity", "--config.model.moe_capacity_factor=1.25"],
}


def variant_config(name: str, steps: int, overrides: list[str]):
  """configs/moe_tiny.py with the variant's keys, `steps` training steps and the caller's `overrides`."""
  config = config_lib.load_config_file(str(CONFIG))
  config_lib.apply_overrides(config, [*VARIANTS[name], *overrides])
  config.train.num_steps = steps or config.train.num_steps
  return config


def routing(workdir: Path, max_batches: int) -> dict:
  """The trained MoE in `workdir` on its validation batches: per layer, each expert's fraction of the routed
  choices, and the fraction of choices dropped, averaged over the batches."""
  run = loader.load(workdir)
  config = run.config
  rows = trainer.prepare_data(config, run.tokenizer, "validation")
  apply = jax.jit(lambda params, batch: run.model.apply({"params": params}, **batch, mutable=["intermediates"])[1])
  loads, dropped = [], []
  for batch in feed.Feed(rows=rows).eval_batches(config.eval.batch_size, max_batches):
    inputs = model_lib.model_inputs(config.model, {k: jnp.asarray(v) for k, v in batch.items()})
    sown = apply(run.params, inputs)["intermediates"]["decoder"]
    layers = sorted(sown, key=lambda name: int(name.rsplit("_", 1)[-1])) if "layers" not in sown else ["layers"]
    load_LxE = np.concatenate(
      [np.reshape(sown[name]["mlp"]["moe_load"][0], (-1, config.model.moe_experts)) for name in layers]
    )
    drop_L = np.concatenate([np.reshape(sown[name]["mlp"]["moe_dropped"][0], (-1,)) for name in layers])
    loads.append(load_LxE)
    dropped.append(drop_L)
  load_LxE = np.mean(loads, axis=0)
  return {
    "load_per_layer_and_expert": np.round(load_LxE, 4).tolist(),
    "load_max_over_mean": float(np.max(load_LxE) * config.model.moe_experts),
    "load_min_over_mean": float(np.min(load_LxE) * config.model.moe_experts),
    "dropped_fraction": float(np.mean(dropped)),
    "batches": len(loads),
  }


def run_variant(name: str, out: Path, steps: int, overrides: list[str], routing_batches: int) -> dict:
  """Trains one variant in OUT/NAME (resuming if it is there) and returns its results row."""
  config = variant_config(name, steps, overrides)
  workdir = out / name
  start = time.time()
  summary = trainer.train(config, workdir)
  wall = time.time() - start
  metrics = plot.read_metrics(workdir)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  per_token = flops.flops_per_token(config.model, config.data.seq_len)
  row = {
    "variant": name,
    "steps": config.train.num_steps,
    "matmul_params": flops.matmul_params(config.model) + flops.inactive_params(config.model),
    "active_matmul_params": flops.matmul_params(config.model),
    "flops_per_token": per_token,
    "train_flops": per_token * tokens_per_step * config.train.num_steps,
    "wall_s": round(wall, 1),
    "step_time_s": summary.get("step_time_s"),
    "final_val_loss": summary.get("final_val_loss"),
    "best_val_loss": summary.get("best_val_loss"),
    "val_loss": {str(step): value for step, value in sorted(metrics.get("val_loss", {}).items())},
  }
  if config.model.moe_experts:
    row["routing"] = routing(workdir, routing_batches)
  (workdir / "experiment.json").write_text(json.dumps(row, indent=2))
  return row


def write_plot(results: list[dict], path: Path) -> None:
  """Validation loss against steps, training FLOPs and wall time, one curve per variant."""
  from matplotlib.figure import Figure

  figure = Figure(figsize=(15, 4.2), layout="constrained")
  panels = figure.subplots(1, 3, sharey=True)
  for row in results:
    steps = np.array([int(step) for step in row["val_loss"]])
    losses = np.array(list(row["val_loss"].values()))
    per_step = row["train_flops"] / row["steps"]
    label = f"{row['variant']} (final {row['final_val_loss']:.3f})"
    for panel, x in zip(panels, (steps, steps * per_step, steps * row["wall_s"] / row["steps"])):
      panel.plot(x, losses, marker="o", markersize=3, label=label)
  for panel, xlabel in zip(panels, ("step", "training FLOPs (active weights)", "wall time (s, approx.)")):
    panel.set_xlabel(xlabel)
    panel.grid(alpha=0.3)
  panels[0].set_ylabel("validation loss (nats/byte)")
  panels[0].set_title("against steps")
  panels[1].set_title("against training FLOPs")
  panels[2].set_title("against wall time (this CPU)")
  panels[0].legend()
  figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder for the runs, results.json and moe.png")
  parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--routing-batches", type=int, default=8, help="validation batches routed after training")
  args, overrides = parser.parse_known_args(argv)
  unknown = [arg for arg in overrides if not arg.startswith("--config.")]
  if unknown:
    parser.error(f"unknown arguments {unknown}; pass config keys as --config.KEY=VALUE")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = args.variants.split(",")
  for name in names:
    if name not in VARIANTS:
      parser.error(f"--variants: {name!r} is not one of {list(VARIANTS)}")
  for name in names:
    run_variant(name, out, args.steps, overrides, args.routing_batches)
  finished = [out / name / "experiment.json" for name in VARIANTS if (out / name / "experiment.json").exists()]
  results = [json.loads(path.read_text()) for path in finished]
  (out / "results.json").write_text(json.dumps(results, indent=2))
  write_plot(results, out / "moe.png")
  for row in results:
    routed = row.get("routing", {})
    print(
      f"{row['variant']:9s} val loss {row['final_val_loss']:.4f}  {row['wall_s']:7.1f} s  "
      f"{row['flops_per_token'] / 1e6:6.2f} MFLOP/token"
      + (
        f"  load max/mean {routed['load_max_over_mean']:.2f}, dropped {routed['dropped_fraction']:.2%}"
        if routed
        else ""
      )
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
