"""The reproductions of docs/reproductions.md (experiments/*.py on jaxlm's public API), each with `--smoke`: a tiny
budget that checks the mechanism (the data, the custom block, the callbacks, the introspection, the evaluation at
other lengths), not the published result, which takes the full runs."""

import copy
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
def test_induction_smoke_trains_attention_only_models_on_repeated_strings_and_scores_heads(tmp_path, monkeypatch):
  results, script = run_smoke("induction_heads", tmp_path, monkeypatch)
  # The training rows are random strings of 8-64 bytes, each repeated to fill the row: every token from the second
  # period on equals the token one period earlier.
  batch = next(script["repeated_strings"]())
  inputs, targets = batch["inputs"], batch["targets"]
  assert inputs.shape == (32, 128) and (inputs[:, 1:] == targets[:, :-1]).all() and inputs.min() >= 4
  periods = [next(p for p in range(8, 65) if (row[p:] == row[:-p]).all()) for row in inputs]
  assert len(set(periods)) > 1 and all(8 <= p <= 64 for p in periods)
  for layers in (2, 1):
    model_config = copy.deepcopy(script["config"].model)
    model_config.num_layers = layers  # the script's own block: attention, no MLP
    model = jaxlm.DecoderLM(model_config, block_cls=script["AttentionOnly"])
    params = jaxlm.load(tmp_path / "runs" / f"layers_{layers}", model=model).params["decoder"]
    assert set(params) == {f"layer_{i}" for i in range(layers)}
    assert set(params["layer_0"]) == {"norm", "self_attention"}  # no MLP
    curve = results[f"layers_{layers}"]["curve"]
    assert [row["step"] for row in curve] == [1, 5, 10]
    for row in curve:  # attention weights: each score is a mean attention, in [0, 1]; one per head
      assert len(row["prefix_matching"]) == len(row["previous_token"]) == 8
      assert all(0 <= score <= 1 for score in row["prefix_matching"] + row["previous_token"])
      assert math.isfinite(row["in_context_score"]) and 0 < row["repeat_loss"] < 10


@pytest.mark.slow
def test_alibi_smoke_scores_two_and_four_times_the_training_length(tmp_path, monkeypatch):
  results, _ = run_smoke("alibi_length", tmp_path, monkeypatch)
  run = jaxlm.load(tmp_path / "runs" / "alibi")
  assert run.config.model.position == "alibi" and "position" not in run.params["embedder"]  # no position table
  perplexity = results["perplexity"]["alibi"]
  assert list(perplexity) == ["1x", "2x", "4x"] and results["train_length"] == 128
  # After 4 steps a byte model is still near uniform (260 ids), at every length alike.
  assert all(1 < value < 260 for value in perplexity.values())
