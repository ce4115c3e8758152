"""Each family trains a few steps on its offline task with `jaxlm train` / `jaxlm eval` (trainer, jaxlm.families)."""

import json

from support import files_config, tiny_config

from jaxlm.tasks import evaluate
from jaxlm.training import trainer


def _losses(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [line["loss"] for line in lines if "loss" in line]


def test_encoder_decoder_trains_on_codesum_and_reports_bleu_beside_baselines(tmp_path):
  c = tiny_config(family="encoder_decoder", position="sinusoidal", norm_position="post", scale_embeddings=True)
  c.data.source, c.data.val_fraction, c.data.max_examples = "codesum", 0.05, 200
  c.data.seq_len, c.data.target_len = 64, 32
  c.train.num_steps, c.train.label_smoothing = 8, 0.1
  c.eval.beam_size, c.eval.bleu_examples, c.eval.max_decode_len = 2, 8, 8
  trainer.train(c, tmp_path)
  losses = _losses(tmp_path)
  assert losses[-1] < losses[0]
  result = evaluate.evaluate(tmp_path)
  assert result["bleu_examples"] == 8 and 0.0 <= result["bleu"] <= 100.0
  assert {"baseline_most_common_bleu", "baseline_name_words_bleu"} <= set(result)
  assert f"BLEU {result['bleu']:.2f} (sacrebleu, 0-100)" in result["summary"]  # the scale, said


def test_encoder_trains_mlm_and_reports_accuracy_beside_unigram_baseline(tmp_path, text_corpus):
  c = files_config(text_corpus, family="encoder", norm_position="post", embed_norm=True, num_token_types=2)
  c.train.num_steps = 8
  trainer.train(c, tmp_path)
  losses = _losses(tmp_path)
  assert losses[-1] < losses[0]
  result = evaluate.evaluate(tmp_path)
  assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 < result["unigram_accuracy"] < 1.0
  assert "unigram baseline" in result["summary"]
