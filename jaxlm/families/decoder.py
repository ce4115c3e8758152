"""The decoder-only family (GPT-2, GPT-3, LLaMA): next-token prediction on packed documents.

Batches: inputs, targets, segment_ids, positions, weights (all B x T; see `jaxlm.data.pipeline.pack_row`).
Evaluation: loss, perplexity and bits per byte, beside the bits per byte `gzip -9` and `xz -9` reach on the
same validation bytes: a language model is a compressor, and this shows where it stands against standard ones.
On (source, target) pairs (`data.source='codesum'`) the decoder learns prompt -> completion
(`jaxlm.tasks.seq2seq.PromptCompletionRows`) and is scored as the encoder-decoder is: loss, and BLEU of its
completions beside the baselines (`seq2seq.evaluate`).
"""

from __future__ import annotations

import gzip
import lzma
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import families
from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm.data import pipeline as data_lib
from jaxlm.data import sources
from jaxlm.inference import decode
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import seq2seq


def build(model_cfg: ModelConfig, decode: bool = False, deterministic: bool = True) -> model_lib.DecoderLM:
  """`DecoderLM` for the model sub-config `model_cfg`; `decode=True` builds it for cached generation."""
  return model_lib.DecoderLM(model_cfg, decode=decode, deterministic=deterministic)


def model_inputs(model_cfg: ModelConfig, batch: dict) -> dict:
  """{'tokens_BxT', 'segment_ids_BxT', 'positions_BxT'} from a batch's inputs, segment_ids and positions."""
  return {"tokens_BxT": batch["inputs"], "segment_ids_BxT": batch["segment_ids"], "positions_BxT": batch["positions"]}


def example_batch(model_cfg: ModelConfig, shape: tuple[int, int]) -> dict:
  """A language-modelling batch of `shape` (B, T): inputs, targets, segment_ids, positions, weights."""
  ones = jnp.ones(shape, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
  return {
    "inputs": ones,
    "targets": ones,
    "segment_ids": ones,
    "positions": positions,
    "weights": jnp.ones(shape, jnp.float32),
  }


def _on_pairs(config: Config) -> bool:
  """True when the whole `config`'s data source holds (source, target) pairs and no documents (codesum): the
  decoder then learns prompt -> completion."""
  source = sources.get(config.data.source)
  return source.documents is None and source.pairs is not None


def check(config: Config) -> None:
  """On pairs, the last data.target_len tokens of a row are the target's: at least 2 of them."""
  if _on_pairs(config) and config.data.target_len < 2:
    raise ConfigError(
      f"data.target_len={config.data.target_len}: a decoder on data.source='{config.data.source}' "
      "keeps the last data.target_len tokens of each row for the target; set it, e.g. "
      "--config.data.target_len=80"
    )


def rows(config: Config, tokenizer, split: str):
  """The split's random-access rows (whole config): prompt -> completion pairs on a source of pairs
  (`data.source='codesum'`), else packed documents or records (`jaxlm.data.pipeline.decoder_rows`)."""
  if _on_pairs(config):
    return seq2seq.prompt_completion_rows(config, tokenizer, split)
  return data_lib.decoder_rows(config, tokenizer, split)


def document_lines(config: Config) -> Iterator[str]:
  """The training documents' lines (whole config), for a SentencePiece vocabulary."""
  if _on_pairs(config):
    yield from seq2seq.pair_lines(config)
    return
  for document in data_lib.load_documents(config.data, "train"):
    yield from document.decode("utf-8", errors="replace").splitlines()


def compression_bits_per_byte(text: bytes) -> dict[str, float]:
  """{'gzip-9': bits per byte, 'xz-9': bits per byte} of `text` under the two standard compressors."""
  bits = lambda compressed: 8 * len(compressed) / max(len(text), 1)
  return {
    "gzip-9": bits(gzip.compress(text, compresslevel=9)),
    "xz-9": bits(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)),
  }


def scored_text(rows, text: bytes, byte_lengths: np.ndarray, num_rows: int, num_bytes: float) -> bytes:
  """The validation bytes that the first `num_rows` rows score, for the compression baselines.

  Packed rows (`PackedRows`) hold the split's tokens in order: their span of `text` is the bytes of the tokens
  they predict (the first token of the split is never a target). Other rows (records, prepared shards): the
  first `num_bytes` bytes of `text`, as many as the scored tokens stand for.

  Args:
    rows: the validation rows.
    text: the split's documents, joined.
    byte_lengths: UTF-8 bytes per token id (`Tokenizer.byte_lengths`).
    num_rows: the rows scored (all of them, or max_batches' worth).
    num_bytes: the bytes of the scored tokens.

  Returns:
    The bytes gzip and xz compress.
  """
  stream = getattr(rows, "stream", None)
  if stream is None or not hasattr(rows, "seq_len"):
    return text[: int(num_bytes)]
  tokens = stream.tokens[: num_rows * rows.seq_len + 1]
  start = int(byte_lengths[tokens[:1]].sum())
  return text[start : start + int(byte_lengths[tokens[1:]].sum())]


def evaluate(evaluation) -> dict:
  """Loss, perplexity, accuracy and bits per byte on the validation split, beside gzip -9 and xz -9 on the same
  bytes, and a one-line summary that says how many batches and tokens it scored; on (source, target) pairs,
  loss and BLEU beside the baselines instead (`seq2seq.evaluate`)."""
  if _on_pairs(evaluation.config):
    return seq2seq.evaluate(evaluation)
  config = evaluation.config
  byte_lengths = evaluation.tokenizer.byte_lengths()
  num_bytes = [0.0]

  def count_bytes(local):  # each process sums the bytes of its own rows
    num_bytes[0] += float(np.sum(byte_lengths[local["targets"]] * local["weights"]))

  totals = evaluation.loss_sums(on_batch=count_bytes)
  all_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes[0]))))
  result = {**evaluation.loss_metrics(totals), "bits_per_byte": totals["nll_sum"] / math.log(2) / max(all_bytes, 1.0)}
  documents = data_lib.load_documents(config.data, "validation")
  num_rows = min(len(evaluation.rows), evaluation.num_batches * config.eval.batch_size)
  text = scored_text(evaluation.rows, b"".join(documents), byte_lengths, num_rows, all_bytes)
  result["baseline_bytes"] = len(text)
  evaluation.log(f"eval: compressing the {len(text):,} scored bytes with gzip -9 and xz -9 (the baselines)")
  for name, bpb in compression_bits_per_byte(text).items():
    result[f"{name}_bits_per_byte"] = bpb
  batches = result["batches"]
  # Training's validation scores the first train.eval_batches batches of the same rows, with the same loss.
  trained = min(config.train.eval_batches, -(-len(evaluation.rows) // config.eval.batch_size))
  note = (
    "the batches training's validation scores"
    if batches == trained
    else f"training's validation scores the first {trained} (train.eval_batches): --max-batches {trained} gives its loss"
  )
  result["summary"] = (
    f"step {result['step']}: validation loss {result['loss']:.4f} on {batches} batch{'es' * (batches != 1)}, "
    f"{result['tokens']:,.0f} "
    f"tokens ({note}); perplexity {result['perplexity']:.3f}, {result['bits_per_byte']:.3f} bits/byte "
    f"(gzip -9: {result['gzip-9_bits_per_byte']:.3f}, xz -9: {result['xz-9_bits_per_byte']:.3f} on the same "
    f"{len(text):,} bytes)"
  )
  return result


class DecoderAdapter(decode.Adapter):
  """`DecoderLM` decoding: the prompt is the start of the sequence to continue, written into the cache."""

  prompt_in_cache = True

  def __init__(self, model_cfg: ModelConfig, start_id: int = 1):
    super().__init__(model_cfg, build(model_cfg, decode=True))

  def prompt_ids(self, tokenizer, text: str) -> list[int]:
    """EOS, then the text's ids."""
    # Training ends every document with EOS, so a new text starts after one.
    return [tokenizer.eos_id] + [int(i) for i in tokenizer.encode(text)]

  def prefill(self, params, prompt, cache_len: int):
    """`prompt`: {'tokens_BxP': right-padded ids, 'lengths_B'}; returns (logits B x P x V, next B x V, state)."""
    tokens_BxP = prompt["tokens_BxP"]
    cache = self._zero_cache(params, {}, tokens_BxP.shape[0], cache_len)
    return self._decode_prompt(params, cache, {}, tokens_BxP, prompt["lengths_B"], cache_len)

  def _cache_shapes(self, params, rows, batch, cache_len):
    tokens = jnp.zeros((batch, cache_len), jnp.int32)
    return jax.eval_shape(lambda: self.module.init(jax.random.key(0), tokens)["cache"])

  def _apply(self, params, cache, rows, tokens_BxT, segment_BxT, positions_BxT, slots_BxT, kv_segment_BxS):
    logits, variables = self.module.apply(
      {"params": params, "cache": cache},
      tokens_BxT,
      segment_BxT,
      positions_BxT,
      cache_index_BxT=slots_BxT,
      kv_segment_ids_BxS=kv_segment_BxS,
      mutable=["cache"],
    )
    return logits, variables["cache"]


FAMILY = families.register(
  families.Family(
    name="decoder",
    build=build,
    model_inputs=model_inputs,
    example_batch=example_batch,
    rows=rows,
    evaluate=evaluate,
    training_text=document_lines,
    attention_layers=lambda model_cfg: (model_cfg.num_layers, 0),
    adapter=DecoderAdapter,
    check=check,
  )
)
