"""Sequence classification families: `encoder_classifier` (BERT, [CLS]) and `decoder_classifier` (the last token).

A task is the data source `data.source` names (`jaxlm.data.sources`), one with label names: today
`stdlib_packages` (`jaxlm.tasks.classify`); a new one is one more registered source. Batches: the decoder's
inputs, segment_ids and positions (B x T), `targets` the label and `weights` 1 (B x 1); the head
(`jaxlm.models.heads.ClassifierHead`) gives logits B x 1 x C, so the trainer's cross-entropy is the
classification loss. Evaluation: accuracy and macro precision, recall and F1
(`jaxlm.tasks.metrics`) beside a majority-class and a bag-of-words naive Bayes baseline, with a per-class table.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.data import sources
from jaxlm.families import decoder, encoder
from jaxlm.models import heads
from jaxlm.models import transformer as model_lib
from jaxlm.parallel import sharding
from jaxlm.tasks import classify
from jaxlm.tasks import metrics as task_metrics
from jaxlm.training import step as train_step


def task_of(config) -> sources.Source:
  """The classification source that the whole `config`'s data.source names (a `jaxlm.data.sources.Source` with
  `labels` and `rows`); ConfigError naming the key if it is none or if model.num_classes does not match its
  labels."""
  task = sources.get(config.data.source)
  if not task.labels:
    raise config_lib.ConfigError(
      f"data.source='{config.data.source}' is no classification task; model.family="
      f"'{config.model.family}' takes one of {', '.join(sources.offering('labels'))}"
    )
  if config.model.num_classes != len(task.labels):
    raise config_lib.ConfigError(
      f"model.num_classes is {config.model.num_classes} but data.source="
      f"'{config.data.source}' has {len(task.labels)} labels; set "
      f"--config.model.num_classes={len(task.labels)}"
    )
  return task


def rows(config, tokenizer, split: str):
  """The task's rows for `split` (whole `config`)."""
  return task_of(config).rows(config, tokenizer, split)


def example_batch(model_cfg, shape: tuple[int, int]) -> dict:
  """A classification batch of `shape` (B, T): the decoder's keys with targets and weights B x 1."""
  batch = decoder.example_batch(model_cfg, shape)
  batch["targets"], batch["weights"] = jnp.ones((shape[0], 1), jnp.int32), jnp.ones((shape[0], 1), jnp.float32)
  return batch


def predicted_logits(evaluation) -> Iterator[tuple[dict, np.ndarray]]:
  """(local batch, logits as numpy) for each scored validation batch of a `jaxlm.tasks.evaluate.Evaluation`, with
  dropout off. The logits are gathered whole, so this serves single-process evaluation."""
  model = train_step.evaluation_mode(evaluation.run.model)
  apply = jax.jit(lambda params, batch: model.apply({"params": params}, **families.model_inputs(model, batch)))
  apply = train_step.under_mesh(evaluation.batch_sharding.mesh, config_lib.mesh_rules(evaluation.config), apply)
  for local in evaluation.batches():  # with progress lines
    yield local, np.asarray(apply(evaluation.params, sharding.global_batch(local, evaluation.batch_sharding)))


def evaluate(evaluation) -> dict:
  """Accuracy and macro P/R/F1 of the model and of both baselines on the scored rows, a per-class table
  ('per_class_table') and a summary line."""
  config = evaluation.config
  task = task_of(config)
  predicted, gold = [], []
  for local, logits_Bx1xC in predicted_logits(evaluation):
    real = local["weights"][:, 0] > 0
    predicted.extend(np.argmax(logits_Bx1xC[:, 0], axis=-1)[real])
    gold.extend(local["targets"][real, 0])
  num_classes = len(task.labels)
  scores = task_metrics.classification_scores(predicted, gold, num_classes)
  result = {"step": evaluation.step, **{k: v for k, v in scores.items() if k != "per_class"}}
  scored = evaluation.rows
  if len(gold) < len(scored):
    scored = classify.ClassificationRows(
      scored.texts[: len(gold)], scored.labels[: len(gold)], scored.tokenizer, scored.seq_len
    )
  baselines = classify.baseline_predictions(rows(config, evaluation.tokenizer, "train"), scored, num_classes)
  for name, guesses in baselines.items():
    baseline = task_metrics.classification_scores(guesses, gold, num_classes)
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
      result[f"{name}_{key}"] = baseline[key]
  result["per_class"] = dict(zip(task.labels, scores["per_class"]))
  result["per_class_table"] = task_metrics.per_class_table(scores, task.labels)
  result["summary"] = (
    f"step {result['step']}: accuracy {result['accuracy']:.3f}, macro P/R/F1 {result['macro_precision']:.3f}/"
    f"{result['macro_recall']:.3f}/{result['macro_f1']:.3f} on {result['examples']} examples; majority "
    f"baseline {result['majority_accuracy']:.3f} (macro F1 {result['majority_macro_f1']:.3f}), naive Bayes "
    f"{result['naive_bayes_accuracy']:.3f} (macro F1 {result['naive_bayes_macro_f1']:.3f})"
  )  # `jaxlm eval` prints the per-class table after this line
  return result


def _training_text(config) -> Iterator[str]:
  """The training examples' lines, for a SentencePiece vocabulary."""
  for text in rows(config, None, "train").texts:
    yield from text.splitlines()


def _family(name: str, build, model_inputs) -> families.Family:
  return families.register(
    families.Family(
      name=name,
      build=build,
      model_inputs=model_inputs,
      example_batch=example_batch,
      rows=rows,
      evaluate=evaluate,
      training_text=_training_text,
      attention_layers=lambda model_cfg: (model_cfg.num_layers, 0),
      head="head",
    )
  )


ENCODER = _family(
  "encoder_classifier",
  lambda model_cfg, decode=False, deterministic=True: model_lib.Encoder(
    model_cfg, deterministic=deterministic, head_cls=heads.FirstTokenClassifier
  ),
  encoder.model_inputs,
)
DECODER = _family(
  "decoder_classifier",
  lambda model_cfg, decode=False, deterministic=True: model_lib.DecoderLM(
    model_cfg, deterministic=deterministic, head_cls=heads.LastTokenClassifier
  ),
  decoder.model_inputs,
)
