"""The extractive question-answering family `encoder_qa`: BERT with a span head, as on SQuAD.

Rows (`jaxlm.tasks.squad`): `BOS question EOS context-window EOS` with token types, `targets` = the answer's (start,
end) positions and `weights` (1, 1) (B x 2); the head (`jaxlm.models.heads.SpanHead`) gives B x 2 x T logits, so the
trainer's cross-entropy is BERT's mean of the start and end losses. Evaluation: exact match and F1 with SQuAD
v1.1's normalization (`jaxlm.tasks.metrics`), best over each example's gold answers, beside the span loss and a
first-words baseline (the context's first as many words as the average training answer has). `jaxlm eval` also
writes RUN/predictions.json, {question id: answer text}, which SQuAD's official evaluate-v1.1.py reads.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import families
from jaxlm.data import sources
from jaxlm.families import classifier, decoder, encoder
from jaxlm.models import heads
from jaxlm.models import transformer as model_lib
from jaxlm.storage import fs
from jaxlm.tasks import metrics as task_metrics
from jaxlm.tasks import squad


def build(model_cfg, decode: bool = False, deterministic: bool = True) -> model_lib.Encoder:
  """`Encoder` with `heads.SpanHead` for the model sub-config `model_cfg`."""
  return model_lib.Encoder(model_cfg, deterministic=deterministic, head_cls=heads.SpanHead)


def example_batch(model_cfg, shape: tuple[int, int]) -> dict:
  """A span batch of `shape` (B, T): the decoder's keys, token_types, and targets and weights B x 2."""
  batch = decoder.example_batch(model_cfg, shape)
  batch["token_types"] = jnp.zeros(shape, jnp.int32)
  batch["targets"], batch["weights"] = jnp.zeros((shape[0], 2), jnp.int32), jnp.ones((shape[0], 2), jnp.float32)
  return batch


def evaluate(evaluation) -> dict:
  """Exact match and F1 (0-100, as SQuAD reports them) on the examples whose windows were all scored, the
  first-words baseline's, the span loss, and a summary line."""
  logits = [logits_Bx2xT[local["weights"][:, 0] > 0] for local, logits_Bx2xT in classifier.predicted_logits(evaluation)]
  rows = evaluation.rows
  logits_Nx2xT = np.concatenate(logits) if logits else np.zeros((0, 2, rows.seq_len))
  predictions = squad.best_spans(rows, logits_Nx2xT)
  if len(logits_Nx2xT) < len(rows) and predictions:  # the last example's windows may be cut by max_batches
    predictions = predictions[: rows.features[len(logits_Nx2xT)].example]
  golds = [example.answers for example in rows.examples[: len(predictions)]]
  train = squad.load_examples(evaluation.config, "train")
  length = max(1, round(np.mean([len(e.answers[0].split()) for e in train if e.answers]))) if train else 1
  baseline = [" ".join(example.context.split()[:length]) for example in rows.examples[: len(predictions)]]
  metrics = evaluation.loss_metrics()
  result = {"step": metrics["step"], "span_loss": metrics["loss"]}
  for name, guesses in (("", predictions), ("first_words_", baseline)):
    scores = task_metrics.squad_scores(guesses, golds) if golds else {"exact_match": 0.0, "f1": 0.0, "examples": 0}
    result[f"{name}exact_match"], result[f"{name}f1"] = 100 * scores["exact_match"], 100 * scores["f1"]
  result["examples"] = len(golds)
  if evaluation.workdir is not None and jax.process_index() == 0:  # for SQuAD's official evaluate-v1.1.py
    path = fs.join(evaluation.workdir, "predictions.json")
    fs.write_text(path, json.dumps(squad.predictions_json(rows.examples, predictions), indent=2, ensure_ascii=False))
    result["predictions"] = str(path)
  result["summary"] = (
    f"step {result['step']}: exact match {result['exact_match']:.2f}, F1 {result['f1']:.2f} "
    f"on {len(golds)} questions (first {length} context words: EM "
    f"{result['first_words_exact_match']:.2f}, F1 {result['first_words_f1']:.2f})"
  )
  return result


def rows(config, tokenizer, split: str):
  """The split's rows: the data source's own (`data.source='squad'`), else SQuAD's (`jaxlm.tasks.squad.rows`)."""
  return (sources.get(config.data.source).rows or squad.rows)(config, tokenizer, split)


def _training_text(config):
  """Questions and contexts of the training split, for a SentencePiece vocabulary."""
  for example in squad.load_examples(config, "train"):
    yield example.question
    yield example.context


FAMILY = families.register(
  families.Family(
    name="encoder_qa",
    build=build,
    model_inputs=encoder.model_inputs,
    example_batch=example_batch,
    rows=rows,
    evaluate=evaluate,
    training_text=_training_text,
    attention_layers=lambda model_cfg: (model_cfg.num_layers, 0),
    head="head",
  )
)
