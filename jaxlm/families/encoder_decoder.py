"""The encoder-decoder family (Vaswani et al., 2017): source text -> target text.

Batches: inputs, input_segment_ids, input_positions (source, B x S); decoder_inputs, targets, segment_ids,
positions, weights (target, B x T), built by `jaxlm.tasks.seq2seq`. Evaluation (`seq2seq.evaluate`, shared
with a decoder trained on the same pairs): validation loss, and corpus BLEU (sacrebleu) of beam-search outputs,
beside `codesum`'s baselines for code summarization or beside copying the source for translation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm import families
from jaxlm.config import ModelConfig
from jaxlm.families import decoder
from jaxlm.inference import decode
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import seq2seq


def build(model_cfg: ModelConfig, decode: bool = False, deterministic: bool = True) -> model_lib.EncoderDecoder:
  """`EncoderDecoder` for the model sub-config `model_cfg`; `decode=True` builds it for cached generation."""
  return model_lib.EncoderDecoder(model_cfg, decoding=decode, deterministic=deterministic)


def model_inputs(model_cfg: ModelConfig, batch: dict) -> dict:
  """The source (inputs_BxS, input_segment_ids_BxS, input_positions_BxS) and target side of a batch."""
  return {
    "inputs_BxS": batch["inputs"],
    "decoder_inputs_BxT": batch["decoder_inputs"],
    "input_segment_ids_BxS": batch["input_segment_ids"],
    "input_positions_BxS": batch["input_positions"],
    "segment_ids_BxT": batch["segment_ids"],
    "positions_BxT": batch["positions"],
  }


def example_batch(model_cfg: ModelConfig, shape: tuple[int, int]) -> dict:
  """A batch of `shape` on both sides: parameter shapes do not depend on the lengths."""
  batch = decoder.example_batch(model_cfg, shape)
  batch.update(
    decoder_inputs=batch["inputs"], input_segment_ids=batch["segment_ids"], input_positions=batch["positions"]
  )
  return batch


class EncoderDecoderAdapter(decode.Adapter):
  """`EncoderDecoder` decoding: the prompt is the source; the encoder runs once and the decoder starts from BOS."""

  prompt_in_cache = False

  def __init__(self, model_cfg: ModelConfig, start_id: int = 1):
    super().__init__(model_cfg, build(model_cfg, decode=True))
    self.start_id = start_id

  def prompt_ids(self, tokenizer, text: str) -> list[int]:
    """The source text's ids."""
    return [int(i) for i in tokenizer.encode(text)]

  def prefill(self, params, prompt, cache_len: int):
    """Encodes the sources (`prompt['tokens_BxP']`) once and feeds BOS; returns (logits, next B x V, state)."""
    tokens_BxS, lengths_B = prompt["tokens_BxP"], prompt["lengths_B"]
    source_segment_BxS = (jnp.arange(tokens_BxS.shape[1])[None] < lengths_B[:, None]).astype(jnp.int32)
    encoded_BxSxD = self.module.apply({"params": params}, tokens_BxS, source_segment_BxS, method="encode")
    rows = {"encoded_BxSxD": encoded_BxSxD, "source_segment_ids_BxS": source_segment_BxS}
    batch = tokens_BxS.shape[0]
    cache = self._zero_cache(params, rows, batch, cache_len)
    start_Bx1 = jnp.full((batch, 1), self.start_id, jnp.int32)
    return self._decode_prompt(params, cache, rows, start_Bx1, jnp.ones((batch,), jnp.int32), cache_len)

  def _cache_shapes(self, params, rows, batch, cache_len):
    tokens = jnp.zeros((batch, cache_len), jnp.int32)
    return jax.eval_shape(
      lambda: self.module.init(
        jax.random.key(0), rows["encoded_BxSxD"], rows["source_segment_ids_BxS"], tokens, method="decode"
      )["cache"]
    )

  def _apply(self, params, cache, rows, tokens_BxT, segment_BxT, positions_BxT, slots_BxT, kv_segment_BxS):
    logits, variables = self.module.apply(
      {"params": params, "cache": cache},
      rows["encoded_BxSxD"],
      rows["source_segment_ids_BxS"],
      tokens_BxT,
      segment_BxT,
      positions_BxT,
      cache_index_BxT=slots_BxT,
      kv_segment_ids_BxS=kv_segment_BxS,
      method="decode",
      mutable=["cache"],
    )
    return logits, variables["cache"]


def _attention_layers(model_cfg: ModelConfig) -> tuple[int, int]:
  decoder_layers = model_cfg.num_decoder_layers or model_cfg.num_layers
  return model_cfg.num_layers + decoder_layers, decoder_layers


FAMILY = families.register(
  families.Family(
    name="encoder_decoder",
    build=build,
    model_inputs=model_inputs,
    example_batch=example_batch,
    rows=seq2seq.prepare,
    evaluate=seq2seq.evaluate,
    training_text=seq2seq.pair_lines,
    attention_layers=_attention_layers,
    adapter=EncoderDecoderAdapter,
    reads_pairs=True,
  )
)
