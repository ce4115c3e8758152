"""Evaluation of the encoder-decoder and encoder families, each beside a trivial baseline.

encoder_decoder: validation loss, and corpus BLEU (sacrebleu) of beam-search
outputs; for code summarization beside `codesum`'s baselines, for
translation beside copying the source.
encoder (BERT): masked-LM loss and accuracy on the masked tokens, beside the
unigram baseline that always guesses the training split's most common token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from jaxlm import codesum, sharding
from jaxlm import tokenizer as tokenizer_lib, train as train_lib, trainer


def evaluate(workdir: Path, config, step: int | None, max_batches: int | None) -> dict:
  from jaxlm import evaluate as evaluate_lib  # local: evaluate imports this module lazily too
  tokenizer = tokenizer_lib.load(workdir)
  s = train_lib.setup(config, sharding.make_mesh(config))
  params, step = evaluate_lib.restore_params(workdir, step, s)
  rows = trainer.prepare_data(config, tokenizer, "validation")
  limit = config.eval.max_batches if max_batches is None else max_batches
  totals = trainer.evaluate_loss(train_lib.make_eval_step(s, s.state_shardings.params), params, rows, s, limit)
  weight = max(totals["weight_sum"], 1.0)
  result = {"step": step, "tokens": totals["weight_sum"], "loss": totals["nll_sum"] / weight,
            "accuracy": totals["correct_sum"] / weight}
  if config.model.family == "encoder_decoder":
    result.update(bleu_scores(config, params, rows, tokenizer))
    result["summary"] = (f"step {step}: validation loss {result['loss']:.4f}, BLEU {result['bleu']:.2f} "
                         f"(beam {config.eval.beam_size}, alpha {config.eval.length_penalty}; baselines: "
                         + ", ".join(f"{k[len('baseline_'):-len('_bleu')]} {v:.2f}" for k, v in result.items()
                                     if k.startswith("baseline_")) + ")")
  else:
    from jaxlm import mlm
    token = mlm.unigram_token(trainer.prepare_data(config, tokenizer, "train"))
    scored_rows = limit * config.eval.batch_size if limit else 0
    result["unigram_accuracy"] = mlm.unigram_accuracy(rows, token, scored_rows)
    result["perplexity"] = math.exp(min(result["loss"], 700))
    result["summary"] = (f"step {step}: MLM loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
                         f"(unigram baseline, always {tokenizer.decode([token])!r}: {result['unigram_accuracy']:.4f})")
  if jax.process_index() == 0:
    (workdir / f"eval_step_{step}.json").write_text(json.dumps(result, indent=2))
  return result


def generate_texts(config, params, rows, tokenizer, num_rows: int) -> list[str]:
  """Beam-search outputs (jaxlm.decode's cached search) for the first `num_rows` pairs, decoded to text."""
  from jaxlm import decode  # local: only encoder-decoder evaluation generates
  e = config.eval
  max_len = e.max_decode_len or config.data.target_len or config.data.seq_len
  searcher = decode.BeamSearcher(config.model, params, start_id=tokenizer.bos_id)
  texts = []
  for first in range(0, num_rows, e.batch_size):
    sources = [list(rows.examples[i][0]) for i in range(first, min(first + e.batch_size, num_rows))]
    # A full batch every time, so the search compiles once; the repeated last source is dropped.
    padded = sources + [sources[-1]] * (e.batch_size - len(sources))
    result = searcher.search(padded, e.beam_size, max_len, tokenizer.eos_id, e.length_penalty)
    for ids in result.tokens[:len(sources)]:
      ids = list(ids)
      texts.append(tokenizer.decode(ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids))
  return texts


def bleu_scores(config, params, rows, tokenizer) -> dict[str, float]:
  num_rows = min(len(rows), config.eval.bleu_examples or len(rows))
  references = rows.references[:num_rows]
  predictions = generate_texts(config, params, rows, tokenizer, num_rows)
  scores = {"bleu": codesum.bleu(predictions, references), "bleu_examples": num_rows}
  d = config.data
  if d.source == "codesum":
    train_pairs = codesum.load_pairs("train", d.val_fraction, d.include_tests)
    eval_pairs = codesum.load_pairs("validation", d.val_fraction, d.include_tests)[:num_rows]
    for name, baseline in codesum.baseline_predictions(train_pairs, eval_pairs).items():
      scores[f"baseline_{name}_bleu"] = codesum.bleu(baseline, references)
  else:
    from jaxlm import seq2seq_data
    sources = [source for source, _ in seq2seq_data.load_pairs(config, "validation")[:num_rows]]
    scores["baseline_copy_source_bleu"] = codesum.bleu(sources, references)
  scores["examples"] = [{"reference": r, "prediction": p} for r, p in zip(references[:5], predictions[:5])]
  return scores
