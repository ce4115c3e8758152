"""experiments/moe.py's mechanism at toy size: a variant trains, routing is measured, results.json and the plot."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A model small enough to train two steps in seconds; the experiment's own keys (experts, dispatch) stay.
TOY = [
  "--config.model.num_layers=1",
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.mlp_dim=64",
  "--config.model.moe_hidden=32",
  "--config.model.max_len=32",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=8",
  "--config.eval.batch_size=8",
  "--config.train.eval_every=2",
  "--config.train.eval_batches=1",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=2",
  "--config.optim.warmup_steps=1",
]


def _experiment():
  spec = importlib.util.spec_from_file_location("moe_experiment", REPO / "experiments" / "moe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # about 40 s on 2 cores: three compiles (train, eval and routing steps)
def test_moe_experiment_writes_results_and_plot(text_corpus, tmp_path):
  pytest.importorskip("matplotlib")
  experiment = _experiment()
  data = ["--config.data.source=files", f"--config.data.paths={text_corpus}/*.txt", "--config.data.val_fraction=0.2"]
  args = ["--out", str(tmp_path), "--steps", "2", "--variants", "capacity", "--routing-batches", "1"]
  assert experiment.main([*args, *TOY, *data]) == 0
  (capacity,) = json.loads((tmp_path / "results.json").read_text())
  assert capacity["variant"] == "capacity" and list(capacity["val_loss"]) == ["2"]
  # The dense peer has the MoE's active weights per token, up to the router (8 experts x d_model 32, 1 layer).
  dense = experiment.variant_config("dense", 2, TOY).model
  assert capacity["active_matmul_params"] - experiment.flops.matmul_params(dense) == 8 * 32
  assert capacity["matmul_params"] > capacity["active_matmul_params"]
  load = capacity["routing"]["load_per_layer_and_expert"]
  assert len(load) == 1 and all(len(layer) == 8 and abs(sum(layer) - 1) < 1e-3 for layer in load)
  assert 0 <= capacity["routing"]["dropped_fraction"] < 1
  assert (tmp_path / "moe.png").stat().st_size > 10_000
  with pytest.raises(SystemExit):  # a misspelled variant is one argparse line, before anything trains
    experiment.main(["--out", str(tmp_path), "--variants", "sparse"])
