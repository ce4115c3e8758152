"""Extractive QA: SQuAD JSON and TFDS reading, windowing with a stride, span decoding, the span head, train + eval."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.tasks import evaluate, squad
from jaxlm.tasks import metrics as task_metrics
from jaxlm.training import trainer

CONTEXT = "The quick brown fox jumps over the lazy dog near the old river bank today"
EXAMPLE = squad.Example("Who jumps?", CONTEXT, ("brown fox",), (CONTEXT.index("brown fox"),))


def squad_json(path, items):
  """Writes SQuAD-format JSON: items are (context, question, answer text)."""
  paragraphs = [
    {"context": c, "qas": [{"id": str(i), "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]}]}
    for i, (c, q, a) in enumerate(items)
  ]
  path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
  return path


def test_windows_cover_the_context_and_hold_the_answer_where_whole():
  tok = ByteTokenizer()
  # prefix = BOS + 10 question bytes + EOS = 12; room = 32 - 12 - 1 = 19 context bytes per window;
  # 74 context bytes, a window every 8 -> offsets 0, 8, ..., 56 (56 + 19 >= 74): 8 windows
  features = squad.features([EXAMPLE], tok, seq_len=32, doc_stride=8)
  assert len(features) == 8
  seen_words = set()
  answers = 0
  for feature in features:
    assert len(feature.ids) <= 32
    seen_words |= {w for w in feature.word_of if w >= 0}
    if feature.start:
      answers += 1
      assert tok.decode(feature.ids[feature.start : feature.end + 1]) == "brown fox"
      assert set(feature.token_types[feature.start : feature.end + 1]) == {1}
    else:
      assert feature.end == 0  # no whole answer: both point at BOS, as BERT's [CLS]
  assert seen_words == set(range(len(CONTEXT.split())))
  # "brown fox" is context bytes 10..18: whole in the windows starting at 0 and 8 only (16 > 10)
  assert answers == 2


def test_best_span_of_perfect_logits_is_the_gold_answer():
  rows = squad.SquadRows(
    [EXAMPLE, squad.Example("Where?", CONTEXT, ("old river bank",), (CONTEXT.index("old river bank"),))],
    ByteTokenizer(),
    seq_len=40,
    doc_stride=10,
  )
  logits = np.zeros((len(rows), 2, 40))
  for i, feature in enumerate(rows.features):
    if feature.start:  # one-hot at the targets of the windows that hold the answer
      logits[i, 0, feature.start] = logits[i, 1, feature.end] = 5.0
  predictions = squad.best_spans(rows, logits)
  assert predictions == ["brown fox", "old river bank"]
  assert task_metrics.squad_scores(predictions, [e.answers for e in rows.examples])["exact_match"] == 1.0


def test_best_span_takes_the_best_window_and_never_ends_before_it_starts():
  rows = squad.SquadRows([EXAMPLE], ByteTokenizer(), seq_len=32, doc_stride=8)
  logits = np.zeros((len(rows), 2, 32))
  last = rows.features[-1]
  river = [p for p, w in enumerate(last.word_of) if w == CONTEXT.split().index("river")]
  logits[-1, 0, river[0]] = logits[-1, 1, river[-1]] = 3.0
  # window 0: a start at 20 and an end at 12 would score 4 + 4 = 8 > 6, but the end precedes the start;
  # every valid pair there scores at most 4 - 10 = -6, so the last window's "river" (3 + 3 = 6) wins
  logits[0] = -10.0
  logits[0, 0, 20] = logits[0, 1, 12] = 4.0
  assert squad.best_spans(rows, logits) == ["river"]


def test_read_json_and_bad_json(tmp_path):
  path = squad_json(tmp_path / "train.json", [(CONTEXT, "Who jumps?", "brown fox")])
  assert squad.read_json(path) == [dataclasses.replace(EXAMPLE, id="0")]
  (tmp_path / "bad.json").write_text(json.dumps({"data": [{"paragraphs": [{"qas": [{"question": "q"}]}]}]}))
  with pytest.raises(config_lib.ConfigError, match="bad.json: not SQuAD format .*'context'"):
    squad.read_json(tmp_path / "bad.json")


def _tfds_records(starts):
  """SQuAD records as TFDS gives them (text as bytes, as prepared data has it), one per answer start."""
  return [
    {
      "id": f"q{i}".encode(),
      "question": b"Who jumps?",
      "context": CONTEXT.encode(),
      "answers": {"text": [b"brown fox"], "answer_start": [start]},
    }
    for i, start in enumerate(starts)
  ]


def test_answers_must_be_at_their_offsets_and_present(tmp_path):
  at = CONTEXT.index("brown fox")
  cases = [
    (
      len(CONTEXT) + 5,
      "answer 'brown fox' is not at answer_start=78 of its 73-character context \\(the text occurs at 10\\)",
    ),
    (at + 7, "answer 'brown fox' is not at answer_start=17 .*occurs at 10"),
    (-1, "answer 'brown fox' is not at answer_start=-1 "),
  ]
  for start, message in cases:
    path = squad_json(tmp_path / "train.json", [(CONTEXT, "Who jumps?", "brown fox")] * 2)
    data = json.loads(path.read_text())
    data["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] = start
    path.write_text(json.dumps(data))
    with pytest.raises(config_lib.ConfigError, match=f"train.json: question '1': {message}"):
      squad.read_json(path)
  data["data"][0]["paragraphs"][1]["qas"][0]["answers"] = []
  path.write_text(json.dumps(data))
  with pytest.raises(config_lib.ConfigError, match="train.json: question '1' has no answers .*unanswerable"):
    squad.read_json(path)


def test_every_scored_question_counts_even_without_a_span():
  # The last question's windows have no scorable span (NaN logits): it predicts '' and still counts.
  rows = squad.SquadRows([EXAMPLE] * 6, ByteTokenizer(), seq_len=40, doc_stride=10)
  logits = np.zeros((len(rows), 2, 40))
  logits[[i for i, f in enumerate(rows.features) if f.example == 5]] = np.nan
  predictions = squad.best_spans(rows, logits)
  assert len(predictions) == 6 and predictions[-1] == "" and all(predictions[:5])
  # Logits for only part of the windows: the examples whose windows were all scored, no more.
  cut = next(i for i, f in enumerate(rows.features) if f.example == 3) + 1
  assert len(squad.best_spans(rows, logits[:cut])) == 3


def test_tfds_squad_source_through_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = tiny_config(family="encoder_qa", num_token_types=2, norm_position="post")
  c.data.source, c.data.tfds_eval_split = "squad", "validation"
  good = _tfds_records([CONTEXT.index("brown fox")] * 3)
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: good):
    rows = squad.rows(c, ByteTokenizer(), "validation")
  assert len(rows.examples) == 3 and len(rows) >= 3  # each example gives a window or more
  row = rows[0]
  assert row["targets"].shape == (2,) and row["inputs"].shape == (c.data.seq_len,)
  bad = _tfds_records([CONTEXT.index("brown fox"), CONTEXT.index("brown fox") + 7])
  with tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: bad):
    with pytest.raises(config_lib.ConfigError, match="TFDS squad split validation: question 'q1': answer 'brown fox'"):
      squad.rows(c, ByteTokenizer(), "validation")


def test_span_head_masks_padding():
  c = tiny_config(family="encoder_qa", num_token_types=2, norm_position="post")
  module = families.get("encoder_qa").build(c.model)
  tokens, segments = jnp.asarray([[1, 5, 6, 2, 0, 0]]), jnp.asarray([[1, 1, 1, 1, 0, 0]])
  params = module.init(jax.random.key(0), tokens, segments)["params"]
  logits = module.apply({"params": params}, tokens, segments)
  assert logits.shape == (1, 2, 6)
  assert (logits[0, :, 4:] < -1e8).all() and (logits[0, :, :4] > -1e8).all()


@pytest.mark.slow  # trains and evaluates: about a minute on a busy 2-core machine
def test_train_then_eval_reports_exact_match_and_f1(tmp_path):
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
  train = [
    (" ".join(words[i:] + words[:i]), f"Where is {words[(i + 2) % 10]}?", words[(i + 2) % 10]) for i in range(10)
  ]
  # validation: the answer is the first context word once in two, so the first-word baseline
  # (training answers are one word long) scores EM 50 and F1 50
  validation = [(" ".join(words), "First?", "alpha"), (" ".join(words), "Third?", "gamma")]
  c = tiny_config(family="encoder_qa", num_token_types=2, norm_position="post")
  c.data.source = "squad"
  c.data.paths = str(squad_json(tmp_path / "train.json", train))
  c.data.validation_paths = str(squad_json(tmp_path / "validation.json", validation))
  c.data.seq_len, c.data.doc_stride, c.eval.max_batches = 48, 16, 0
  trainer.train(c, tmp_path / "run")
  result = evaluate.evaluate(tmp_path / "run")
  assert result["examples"] == 2
  assert result["first_words_exact_match"] == pytest.approx(50.0)
  assert result["first_words_f1"] == pytest.approx(50.0)
  assert 0.0 <= result["exact_match"] <= result["f1"] <= 100.0
  assert np.isfinite(result["span_loss"]) and "exact match" in result["summary"]
  # The official evaluate-v1.1.py reads {question id: answer text}; the scores above come from the same answers.
  predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
  assert list(predictions) == ["0", "1"] and result["predictions"].endswith("predictions.json")
  golds = [("alpha",), ("gamma",)]
  assert 100 * task_metrics.squad_scores(list(predictions.values()), golds)["exact_match"] == result["exact_match"]
