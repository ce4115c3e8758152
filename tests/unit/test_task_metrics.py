"""SQuAD v1.1 exact match / F1 and classification scores on hand-made cases (values worked out in comments)."""

import pytest

from jaxlm.tasks import metrics as task_metrics


def test_normalization_follows_squad_v1_1():
  # lower case, punctuation dropped, articles dropped, whitespace collapsed
  assert task_metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert task_metrics.normalize_answer("An apple, a day") == "apple day"
  # "theme" keeps its "the": only whole-word articles go
  assert task_metrics.normalize_answer("Theme\tpark") == "theme park"


def test_token_f1_by_hand():
  # prediction -> "cat sat on mat" (4 tokens), gold -> "cat on mat" (3); 3 shared:
  # P = 3/4, R = 3/3, F1 = 2 * 0.75 * 1 / 1.75 = 6/7
  assert task_metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
  # bags: "x x y" vs "x y y" share one x and one y: P = R = 2/3, F1 = 2/3
  assert task_metrics.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
  assert task_metrics.token_f1("blue", "red") == 0.0
  assert task_metrics.exact_match("Denver Broncos.", "the denver broncos") == 1.0


def test_squad_scores_take_the_best_gold_answer():
  predictions = ["Denver Broncos", "in 1990", "blue"]
  golds = [["Denver Broncos", "Broncos"], ["1990", "the year 1990"], ["red"]]
  # 1: EM 1, F1 1.  2: vs "1990": EM 0, P = 1/2, R = 1 -> F1 2/3; vs "year 1990": P = R = 1/2 -> F1 1/2;
  # best 2/3.  3: 0 and 0.  Means: EM 1/3, F1 (1 + 2/3 + 0) / 3 = 5/9.
  scores = task_metrics.squad_scores(predictions, golds)
  assert scores["exact_match"] == pytest.approx(1 / 3)
  assert scores["f1"] == pytest.approx(5 / 9)
  assert scores["examples"] == 3


def test_classification_scores_by_hand():
  gold = [0, 0, 0, 1, 1, 2]
  predicted = [0, 0, 1, 1, 2, 2]
  # hits per class [2, 1, 1] -> accuracy 4/6. Predicted counts [2, 2, 2] -> precision [1, 1/2, 1/2];
  # supports [3, 2, 1] -> recall [2/3, 1/2, 1]; F1 [0.8, 0.5, 2/3].
  # macro P = 2/3, macro R = (2/3 + 1/2 + 1) / 3 = 13/18, macro F1 = (4/5 + 1/2 + 2/3) / 3 = 59/90.
  scores = task_metrics.classification_scores(predicted, gold, 3)
  assert scores["accuracy"] == pytest.approx(2 / 3)
  assert scores["macro_precision"] == pytest.approx(2 / 3)
  assert scores["macro_recall"] == pytest.approx(13 / 18)
  assert scores["macro_f1"] == pytest.approx(59 / 90)
  assert [row["support"] for row in scores["per_class"]] == [3, 2, 1]
  assert scores["per_class"][0]["f1"] == pytest.approx(0.8)
  table = task_metrics.per_class_table(scores, ["zero", "one", "two"])
  assert table.splitlines()[1].split() == ["zero", "1.000", "0.667", "0.800", "3"]


def test_a_class_never_predicted_has_precision_zero():
  # always class 0 on gold [0, 1]: class 0 P = 1/2, R = 1; class 1 P = 0 (never predicted), R = 0
  scores = task_metrics.classification_scores([0, 0], [0, 1], 2)
  assert scores["accuracy"] == 0.5
  assert scores["macro_precision"] == pytest.approx(0.25)
  assert scores["macro_recall"] == pytest.approx(0.5)
  assert scores["macro_f1"] == pytest.approx((2 * 0.5 / 1.5) / 2)  # class 0 F1 = 2/3, class 1 F1 = 0
