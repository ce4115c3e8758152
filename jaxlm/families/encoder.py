"""The encoder-only family (BERT): masked-language modelling.

Batches: the decoder's keys, where `inputs` holds the masked tokens, `targets` the originals and `weights` is
1 only where a token was masked (`jaxlm.tasks.mlm`), plus optional `token_types`. Evaluation: masked-LM loss and
accuracy on the masked tokens, beside the unigram baseline that always guesses the training split's most
common token. An encoder does not generate text, so it has no decoding adapter.
"""

from __future__ import annotations

from jaxlm import families
from jaxlm.config import ModelConfig
from jaxlm.families import decoder
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import mlm


def build(model_cfg: ModelConfig, decode: bool = False, deterministic: bool = True) -> model_lib.Encoder:
  """`Encoder` (BERT with its MLM head) for the model sub-config `model_cfg`; it has no cache to decode with."""
  return model_lib.Encoder(model_cfg, decode=decode, deterministic=deterministic)


def model_inputs(model_cfg: ModelConfig, batch: dict) -> dict:
  """The decoder's inputs, plus `token_types_BxT` when the batch has token types."""
  inputs = decoder.model_inputs(model_cfg, batch)
  if "token_types" in batch:
    inputs["token_types_BxT"] = batch["token_types"]
  return inputs


def evaluate(evaluation) -> dict:
  """MLM loss, accuracy and perplexity, beside the unigram baseline, and a one-line summary."""
  metrics = evaluation.loss_metrics()
  result = {key: metrics[key] for key in ("step", "tokens", "loss", "accuracy")}
  config, tokenizer = evaluation.config, evaluation.tokenizer
  token = mlm.unigram_token(mlm.prepare(config, tokenizer, "train"))
  scored_rows = evaluation.max_batches * config.eval.batch_size if evaluation.max_batches else 0
  result["unigram_accuracy"] = mlm.unigram_accuracy(evaluation.rows, token, scored_rows)
  result["perplexity"] = metrics["perplexity"]
  result["summary"] = (
    f"step {result['step']}: MLM loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} "
    f"(unigram baseline, always {tokenizer.decode([token])!r}: {result['unigram_accuracy']:.4f})"
  )
  return result


FAMILY = families.register(
  families.Family(
    name="encoder",
    build=build,
    model_inputs=model_inputs,
    example_batch=decoder.example_batch,
    rows=mlm.prepare,
    evaluate=evaluate,
    training_text=decoder.document_lines,
    attention_layers=lambda model_cfg: (model_cfg.num_layers, 0),
    head="mlm_head",
  )
)
