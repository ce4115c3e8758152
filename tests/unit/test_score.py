"""`Run.score` and `jaxlm.inference.score`: per-token log-probabilities equal the trainer's cross-entropy on the same
tokens; batching, padding and windows change nothing; hidden states; the refusals."""

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.inference import score as score_lib
from jaxlm.training import step as train_step

TEXTS = ["def main():\n    return 0\n", "x", "", "import os\nprint(os.getcwd())\n"]  # each within model.max_len


@pytest.fixture(scope="module")
def run(cli_run):
  """The session's tiny CLI-trained decoder (configs/tiny.py: model.max_len 64, byte tokens)."""
  return jaxlm.load(cli_run[0])


def model_logprobs(run, ids):
  """log P(ids[i + 1] | ids[: i + 1]) for each i, from one plain `model.apply` on the whole of `ids`."""
  logits_1xTxV = run.model.apply({"params": run.params}, np.asarray([ids[:-1]], np.int32))
  logp_TxV = np.asarray(jax.nn.log_softmax(logits_1xTxV[0].astype(np.float32)))
  return logp_TxV[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def trainer_nll(run, ids):
  """Mean NLL of ids[1:] given the tokens before them, by the trainer's own loss on one packed row."""
  ids = np.asarray(ids, np.int32)[None]
  batch = {
    "inputs": ids[:, :-1],
    "targets": ids[:, 1:],
    "segment_ids": np.ones_like(ids[:, :-1]),
    "positions": np.arange(ids.shape[1] - 1, dtype=np.int32)[None],
    "weights": np.ones(ids[:, 1:].shape, np.float32),
  }
  sums = train_step.cross_entropy_loss(run.config.train)(run.model, run.params, batch, {})
  return float(sums["nll_sum"] / sums["weight_sum"])


def test_loss_equals_the_trainers_cross_entropy_on_the_same_tokens(run):
  scored = run.score(TEXTS, batch_size=3)
  eos = run.tokenizer.eos_id
  for text, result in zip(TEXTS, scored):
    ids = [int(i) for i in run.tokenizer.encode(text)]
    assert list(result.token_ids) == ids and result.num_tokens == len(ids) == len(result.logprobs)
    if not ids:
      assert np.isnan(result.loss)
      continue
    assert result.loss == pytest.approx(trainer_nll(run, [eos, *ids]), rel=1e-5)
    assert result.loss == pytest.approx(-result.logprobs.mean(), rel=1e-6)
    assert np.all(result.logprobs <= 0)


def test_batching_and_padding_change_no_score(run):
  together = run.score(TEXTS, batch_size=4)
  for text, joint in zip(TEXTS, together):
    alone = run.score([text], batch_size=1)[0]
    np.testing.assert_allclose(alone.logprobs, joint.logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(alone.is_greedy, joint.is_greedy)


def test_long_text_is_scored_whole_in_windows_with_context(run):
  text = "".join(f"line {i}: value = {i * 7 % 13}\n" for i in range(30))  # about 600 tokens, max_len 64
  ids = [int(i) for i in run.tokenizer.encode(text)]
  full = [run.tokenizer.eos_id, *ids]
  result = run.score([text], max_len=32, stride=8)[0]
  assert result.num_tokens == len(ids) > 32 and np.all(np.isfinite(result.logprobs))
  # The first window: every token with all the text before it.
  first = run.score([text[:20]], max_len=32)[0]
  np.testing.assert_allclose(result.logprobs[: first.num_tokens], first.logprobs, rtol=1e-5, atol=1e-6)
  # Later windows: 32 tokens that advance by 8, each scoring its last 8 (with 24 to 31 tokens before them);
  # the last window ends at the text's end.
  second = model_logprobs(run, full[8:41])  # the second window feeds full[8:40]
  np.testing.assert_allclose(result.logprobs[32:40], second[24:32], rtol=1e-5, atol=1e-6)
  assert result.logprobs[-1] == pytest.approx(model_logprobs(run, full[-33:])[-1], rel=1e-5)


def test_windows_cover_each_position_once_with_enough_context():
  for first, end, max_len, stride in [
    (0, 100, 32, 8),
    (0, 20, 32, 16),
    (50, 60, 32, 16),
    (40, 300, 64, 64),
    (5, 5, 8, 4),
  ]:
    owned = []
    for start, begin, stop in score_lib.windows(first, end, max_len, stride):
      assert stop - start <= max_len and start <= begin < stop
      assert begin - start >= min(begin, max_len - stride)  # context before every owned position
      owned.extend(range(begin, stop))
    assert owned == list(range(first, end))


def test_hidden_states_are_the_models_at_each_token(run):
  text = TEXTS[0]
  result = run.score([text, TEXTS[1]], hidden_states=True)[0]
  tokens = np.asarray([[run.tokenizer.eos_id, *run.tokenizer.encode(text)]], np.int32)
  _, states = run.model.apply({"params": run.params}, tokens, return_hidden_states=True)
  assert len(result.hidden_states) == run.config.model.num_layers + 1
  for ours, model_1xTxD in zip(result.hidden_states, states):
    np.testing.assert_allclose(ours, np.asarray(model_1xTxD)[0, 1:], rtol=1e-4, atol=1e-5)
  assert run.score([text])[0].hidden_states is None


def test_loglikelihood_is_the_continuations_log_probability(run):
  context, continuation = "def main():\n", "    return 0\n"
  (logprob, greedy), (empty, _) = score_lib.loglikelihood(run, [(context, continuation), ("", continuation)])
  whole = run.score([context + continuation])[0]
  split = len(run.tokenizer.encode(context))
  assert logprob == pytest.approx(float(whole.logprobs[split:].sum()), rel=1e-5)
  assert greedy == bool(whole.is_greedy[split:].all())
  assert empty == pytest.approx(float(run.score([continuation])[0].logprobs.sum()), rel=1e-5)
  # The context's trailing space moves to the continuation, as the harness splits them.
  assert score_lib.split_encode(run.tokenizer, "a ", "b") == ([101], [36, 102])


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"max_len": 65}, "max_len=65: choose 2 to 64"),
    ({"max_len": 32, "stride": 33}, "stride=33: choose 1 to max_len=32"),
    ({"batch_size": 0}, "batch_size=0"),
  ],
)
def test_bad_options_are_refused_in_one_line(run, kwargs, message):
  with pytest.raises(score_lib.ScoreError, match=message):
    run.score(["abc"], **kwargs)
  with pytest.raises(score_lib.ScoreError, match="pass a list of strings"):
    run.score("abc")


@pytest.mark.parametrize(
  "family, why",
  [
    ("encoder_decoder", "it scores a target only given a source"),
    ("encoder", "its 'mlm_head' head gives no next-token probabilities"),
    ("decoder_classifier", "its 'head' head gives no next-token probabilities"),
  ],
)
def test_a_run_of_another_family_is_refused(run, family, why):
  config = run.config.copy_and_resolve_references()
  config.model.family = family
  with pytest.raises(score_lib.ScoreError, match=f"needs a decoder run.*'{family}': {why}"):
    run._replace(config=config).score(["abc"])
