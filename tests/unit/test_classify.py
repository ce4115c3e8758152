"""Sequence classification: the heads' pooling, the rows, naive Bayes, the stdlib-package task, train + eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import LABELS, classify_config, use_tiny_task

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.families import classifier
from jaxlm.tasks import classify, evaluate
from jaxlm.training import trainer


def test_rows_hold_bos_text_eos_and_one_label():
  rows = classify.ClassificationRows(["ab", "x" * 50], [2, 1], ByteTokenizer(), 8)
  row = rows[0]
  tok = ByteTokenizer()
  assert list(row["inputs"][:4]) == [tok.bos_id, *tok.encode("ab"), tok.eos_id]
  assert list(row["segment_ids"]) == [1, 1, 1, 1, 0, 0, 0, 0]
  assert list(row["targets"]) == [2] and list(row["weights"]) == [1.0]
  long = rows[1]  # cut to seq_len, still ending in EOS
  assert long["inputs"][-1] == tok.eos_id and long["segment_ids"].all()
  assert rows.padding_row()["weights"].sum() == 0


def test_decoder_classifier_reads_the_last_real_token():
  c = classify_config("decoder_classifier")
  module = families.get("decoder_classifier").build(c.model)
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 0, 0, 0]])
  segments = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]])
  params = module.init(jax.random.key(0), tokens, segments)["params"]
  logits = module.apply({"params": params}, tokens, segments)
  assert logits.shape == (1, 1, len(LABELS))
  # causal attention + last-token pooling: the padded row scores as the unpadded 5-token sequence does
  unpadded = module.apply({"params": params}, tokens[:, :5], segments[:, :5])
  np.testing.assert_allclose(logits, unpadded, atol=1e-5)
  changed = module.apply({"params": params}, tokens.at[0, 4].set(20), segments)
  assert not np.allclose(logits, changed, atol=1e-5)


def test_encoder_classifier_reads_cls_and_ignores_padding():
  c = classify_config("encoder_classifier")
  module = families.get("encoder_classifier").build(c.model)
  tokens = jnp.asarray([[1, 6, 7, 2, 0, 0]])
  segments = jnp.asarray([[1, 1, 1, 1, 0, 0]])
  params = module.init(jax.random.key(0), tokens, segments)["params"]
  assert "head" in params and "mlm_head" not in params
  logits = module.apply({"params": params}, tokens, segments)
  assert logits.shape == (1, 1, len(LABELS))
  padding_changed = module.apply({"params": params}, tokens.at[0, 5].set(30), segments)
  np.testing.assert_allclose(logits, padding_changed, atol=1e-5)


def test_naive_bayes_by_hand():
  # words: apple, banana, cherry. class 0 counts (2, 0, 0), class 1 (0, 1, 1); alpha 1 ->
  # P(w|0) = (3, 1, 1)/5, P(w|1) = (1, 2, 2)/5; priors 1/2 each.
  # "apple cherry": class 0: log(3/5) + log(1/5); class 1: log(1/5) + log(2/5) -> class 0 (3 > 2).
  # "cherry cherry": class 0: 2 log(1/5) < class 1: 2 log(2/5) -> class 1. "durian" is unseen: a prior tie -> 0.
  predicted = classify.naive_bayes(
    ["apple apple", "banana cherry"], [0, 1], ["apple cherry", "cherry cherry", "durian"], 2
  )
  assert list(predicted) == [0, 1, 0]


def test_num_classes_must_match_the_task():
  c = classify_config("encoder_classifier")
  c.model.num_classes = 4
  with pytest.raises(config_lib.ConfigError, match="model.num_classes is 4 .* has 10 labels"):
    classifier.rows(c, ByteTokenizer(), "train")


@pytest.mark.slow  # trains and evaluates: about a minute on a busy 2-core machine
@pytest.mark.parametrize("family", ["encoder_classifier", "decoder_classifier"])
def test_train_then_eval_reports_task_metrics(family, tmp_path, monkeypatch):
  use_tiny_task(monkeypatch)
  c = classify_config(family)
  trainer.train(c, tmp_path)
  result = evaluate.evaluate(tmp_path)
  assert result["examples"] == 4
  # majority of train is class 0 (ties: lowest label); validation [0, 0, 1, 2] -> accuracy 2/4,
  # macro precision (1/2 + 0 + 0)/3, macro recall (1 + 0 + 0)/3
  assert result["majority_accuracy"] == pytest.approx(0.5)
  assert result["majority_macro_precision"] == pytest.approx(1 / 6)
  assert result["majority_macro_recall"] == pytest.approx(1 / 3)
  # each class's words are its own, so naive Bayes is perfect here
  assert result["naive_bayes_accuracy"] == 1.0
  assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["macro_f1"] <= 1.0
  assert set(result["per_class"]) == set(LABELS)
  assert sum(row["support"] for row in result["per_class"].values()) == 4
  assert "naive Bayes" in result["summary"] and "gamma" in result["per_class_table"]


@pytest.mark.slow
def test_stdlib_packages_task_has_every_package_in_both_splits():
  train = classify.load_examples("train", 0.2)
  validation = classify.load_examples("validation", 0.2)
  for split in (train, validation):
    assert set(e.label for e in split) == set(range(len(classify.PACKAGES)))
  assert not {e.source for e in train} & {e.source for e in validation}
