"""The reproductions of docs/reproductions.md (experiments/*.py on jaxlm's public API), each with `--smoke`: a tiny
budget that checks the mechanism (the data, the custom block, the callbacks, the introspection, the evaluation at
other lengths), not the published result, which takes the full runs."""

import json
import math
import runpy
import sys

import pytest
from support import REPO

import jaxlm


def run_smoke(name: str, tmp_path, monkeypatch) -> tuple[dict, dict]:
  """experiments/NAME.py --smoke in this process, from the repository root; returns its results JSON and its
  globals."""
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, "argv", [name, "--smoke", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path)])
  namespace = runpy.run_path(str(REPO / "experiments" / f"{name}.py"), run_name="__main__")
  assert (tmp_path / f"{name}.png").stat().st_size > 0
  return json.loads((tmp_path / f"{name}.json").read_text()), namespace


@pytest.mark.slow
def test_grokking_smoke_memorizes_modular_addition(tmp_path, monkeypatch):
  results, script = run_smoke("grokking", tmp_path, monkeypatch)
  assert results["p"] == 23 and results["train_pairs"] + results["test_pairs"] == 23**2
  # The test set is exactly the held-out pairs, and only the answer at '=' (id p) is scored.
  train, test = (set(map(tuple, split["inputs"][:, :2].tolist())) for split in script["splits"].values())
  assert not train & test and len(train | test) == 23**2
  test_batch = script["splits"]["test"]
  assert (test_batch["inputs"][:, 2] == 23).all() and test_batch["weights"][:, :2].sum() == 0
  for run in ("weight_decay_1.0", "weight_decay_0.0"):
    curve = results[run]["curve"]
    assert [row["step"] for row in curve] == [1, *range(10, 81, 10)]
    # Full-batch training on 320 pairs memorizes them within 80 steps; the accuracy is measured by the Callback.
    assert curve[-1]["train_acc"] == 1.0 and results[run]["train_acc_above_0.99"] <= 80
    assert curve[-1]["train_loss"] < curve[0]["train_loss"] / 10
    # On the held-out pairs the model is already well above chance (1/23), e.g. from a + b = b + a.
    assert 3 / 23 < curve[-1]["test_acc"] <= 1 and math.isfinite(curve[-1]["test_loss"])


@pytest.mark.slow
def test_induction_smoke_trains_an_attention_only_model_and_scores_heads(tmp_path, monkeypatch):
  results, script = run_smoke("induction_heads", tmp_path, monkeypatch)
  params = jaxlm.load(tmp_path / "runs", model=script["model"]).params["decoder"]  # the script's own module
  assert set(params) == {"layer_0", "layer_1"} and set(params["layer_0"]) == {"norm", "self_attention"}  # no MLP
  first, last = results["curve"][0], results["curve"][-1]
  assert last["step"] == 10 and last["loss"] < first["loss"]
  assert len(last["prefix_matching"]) == 8 and all(0 <= score <= 1 for score in last["prefix_matching"])
  assert math.isfinite(last["in_context_score"]) and results["best_head_layer_2"] in range(8)


@pytest.mark.slow
def test_alibi_smoke_scores_two_and_four_times_the_training_length(tmp_path, monkeypatch):
  results, _ = run_smoke("alibi_length", tmp_path, monkeypatch)
  run = jaxlm.load(tmp_path / "runs" / "alibi")
  assert run.config.model.position == "alibi" and "position" not in run.params["embedder"]  # no position table
  perplexity = results["perplexity"]["alibi"]
  assert list(perplexity) == ["1x", "2x", "4x"] and results["train_length"] == 128
  # After 4 steps a byte model is still near uniform (260 ids), at every length alike.
  assert all(1 < value < 260 for value in perplexity.values())
