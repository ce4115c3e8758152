"""Transformer families built from `jaxlm.models.layers`.

`DecoderLM` covers GPT-2 and LLaMA styles by config, `EncoderDecoder` the
Transformer of Vaswani et al. (2017) and `Encoder` BERT. Inputs follow one
convention across families: `segment_ids` (0 is padding, equal ids attend to
each other) and `positions` (restarting at 0 in every packed segment).
Shape letters are explained in `jaxlm.models.layers`.

Batch keys per family (see `example_batch`; each family lives in `jaxlm.families`):
  decoder:          inputs, targets, segment_ids, positions, weights (all B x T).
  encoder (MLM):    the same; `inputs` holds the masked tokens, `targets` the
                    originals and `weights` is 1 only where a token was masked.
  encoder_decoder:  inputs, input_segment_ids, input_positions (source, B x S);
                    decoder_inputs (BOS + targets shifted right, per segment),
                    targets, segment_ids, positions, weights (target, B x T).
                    Segment k of the target attends to segment k of the source
                    only, so packed pairs never see each other.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import families
from jaxlm.models import layers, moe

Array = jax.Array


def default_segments(tokens_BxT: Array, segment_ids_BxT: Array | None, positions_BxT: Array | None):
  """One unpadded segment per row when the caller gives none."""
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones_like(tokens_BxT)
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  return segment_ids_BxT, positions_BxT


def _causal_mask(
  segment_ids_BxT: Array, kv_segment_ids_BxS: Array | None, cache_index_BxT: Array | None, decoding: bool
) -> Array:
  """The causal self-attention mask: over the filled cache slots (`kv_segment_ids_BxS`, each query at its
  `cache_index_BxT`) while decoding with the cache, else within each packed segment."""
  if decoding and kv_segment_ids_BxS is not None:
    kv_index_BxS = jnp.arange(kv_segment_ids_BxS.shape[1])[None]
    return layers.attention_mask(
      segment_ids_BxT, kv_segment_ids_BxS, causal=True, q_index_BxT=cache_index_BxT, kv_index_BxS=kv_index_BxS
    )
  return layers.segment_mask(segment_ids_BxT, segment_ids_BxT, causal=True)


class DecoderLM(nn.Module):
  """Decoder-only language model: tokens (or their embeddings) -> next-token logits B x T x V.

  With `decode=True`, `cache_index_BxT` gives each query's cache slot so a
  prompt batch of mixed lengths decodes with per-row positions; the caller's
  `kv_segment_ids_BxS` marks which cache slots are filled.

  `block_cls`, `attention_cls` and `mlp_cls` go to `layers.Stack` (a custom
  block keeps scan, remat, the cache and dropout). Introspection:
  `inputs_embeds_BxTxD` replaces the token lookup (`token_embeddings`), as in
  Hugging Face (positions are still added); `return_hidden_states=True`
  returns (logits, hidden_states), a tuple of num_layers + 1 arrays B x T x D:
  the embedder's output, then every block's output (before the final norm).
  `attention_weights(model, params, tokens_BxT)` returns every layer's
  attention weights.
  """

  cfg: ml_collections.ConfigDict
  decode: bool = False
  deterministic: bool = True
  block_cls: Any = None  # None: layers.block_class(cfg)
  attention_cls: Any = layers.Attention
  mlp_cls: Any = layers.Mlp
  head_cls: Any = None  # None: tied next-token logits; else `head_cls(cfg)(x_BxTxD, embedder, segment_ids_BxT)`

  def setup(self):
    cfg = self.cfg
    self.embedder = layers.Embedder(cfg, self.deterministic)
    self.decoder = layers.Stack(
      cfg,
      cfg.num_layers,
      decode=self.decode,
      deterministic=self.deterministic,
      causal=True,
      block_cls=self.block_cls,
      attention_cls=self.attention_cls,
      mlp_cls=self.mlp_cls,
      moe_mlp_cls=moe.MoeMlp,
    )
    self.final_norm = _final_norm(cfg)
    self.head = self.head_cls(cfg) if self.head_cls is not None else None

  def token_embeddings(self, tokens_BxT: Array) -> Array:
    """The token lookup alone, B x T x D: what `inputs_embeds_BxTxD` replaces."""
    return self.embedder.token(tokens_BxT)

  def __call__(
    self,
    tokens_BxT: Array | None = None,
    segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None,
    cache_index_BxT: Array | None = None,
    kv_segment_ids_BxS: Array | None = None,
    *,
    inputs_embeds_BxTxD: Array | None = None,
    return_hidden_states: bool = False,
  ) -> Array | tuple[Array, tuple[Array, ...]]:
    if (tokens_BxT is None) == (inputs_embeds_BxTxD is None):
      raise ValueError("DecoderLM takes tokens_BxT or inputs_embeds_BxTxD, exactly one of them")
    shape_BxT = tokens_BxT if tokens_BxT is not None else jnp.zeros(inputs_embeds_BxTxD.shape[:2], jnp.int32)
    segment_ids_BxT, positions_BxT = default_segments(shape_BxT, segment_ids_BxT, positions_BxT)
    mask = _causal_mask(segment_ids_BxT, kv_segment_ids_BxS, cache_index_BxT, self.decode)
    x_BxTxD = self.embedder.embed(tokens_BxT, positions_BxT, inputs_embeds_BxTxD=inputs_embeds_BxTxD)
    embedded_BxTxD = x_BxTxD
    outputs = self.decoder(x_BxTxD, mask, positions_BxT, return_hidden_states=return_hidden_states)
    x_BxTxD, hidden_LxBxTxD = outputs if return_hidden_states else (outputs, None)
    x_BxTxD = self.final_norm(x_BxTxD)
    logits_BxTxV = (
      self.embedder.logits(x_BxTxD) if self.head is None else self.head(x_BxTxD, self.embedder, segment_ids_BxT)
    )
    if not return_hidden_states:
      return logits_BxTxV
    return logits_BxTxV, (embedded_BxTxD, *hidden_LxBxTxD)


def _final_norm(cfg, name: str | None = None):
  """Pre-norm stacks end un-normalized (each sublayer normalizes its input); post-norm ones already end in a norm."""
  return layers.Norm(cfg, name=name) if cfg.norm_position == "pre" else (lambda x: x)


class EncoderDecoder(nn.Module):
  """The Transformer of Vaswani et al. (2017): source tokens -> target logits.

  One `Embedder` serves source, target and the pre-softmax projection (shared,
  tied embeddings, scaled by sqrt(d_model) when `model.scale_embeddings`).
  `encode` and `decode` are separate methods so cached generation runs the
  encoder once: apply with `method="encode"`, then `method="decode"` with
  `decoding=True` and `mutable=["cache"]`. (`decoding` plays the role of
  `DecoderLM.decode`, whose name the `decode` method takes here; `build`
  maps its `decode` argument onto it.)
  """

  cfg: ml_collections.ConfigDict
  decoding: bool = False
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.embedder = layers.Embedder(cfg, self.deterministic)
    self.encoder = layers.Stack(cfg, cfg.num_layers, deterministic=self.deterministic, moe_mlp_cls=moe.MoeMlp)
    self.encoder_norm = _final_norm(cfg)
    self.decoder = layers.Stack(
      cfg,
      cfg.num_decoder_layers or cfg.num_layers,
      cross=True,
      decode=self.decoding,
      deterministic=self.deterministic,
      causal=True,
      moe_mlp_cls=moe.MoeMlp,
    )
    self.decoder_norm = _final_norm(cfg)

  def encode(
    self, tokens_BxS: Array, segment_ids_BxS: Array | None = None, positions_BxS: Array | None = None
  ) -> Array:
    segment_ids_BxS, positions_BxS = default_segments(tokens_BxS, segment_ids_BxS, positions_BxS)
    mask = layers.segment_mask(segment_ids_BxS, segment_ids_BxS, causal=False)
    x_BxSxD = self.embedder.embed(tokens_BxS, positions_BxS)
    return self.encoder_norm(self.encoder(x_BxSxD, mask, positions_BxS))

  def decode(
    self,
    encoded_BxSxD: Array,
    input_segment_ids_BxS: Array,
    tokens_BxT: Array,
    segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None,
    cache_index_BxT: Array | None = None,
    kv_segment_ids_BxS: Array | None = None,
  ) -> Array:
    """Target logits. While decoding with the cache, as in `DecoderLM`: `cache_index_BxT` gives each
    query's cache slot and `kv_segment_ids_BxS` marks the filled slots."""
    segment_ids_BxT, positions_BxT = default_segments(tokens_BxT, segment_ids_BxT, positions_BxT)
    mask = _causal_mask(segment_ids_BxT, kv_segment_ids_BxS, cache_index_BxT, self.decoding)
    # Source padding (segment 0) never matches a target segment, so it is never read.
    cross_mask = layers.segment_mask(segment_ids_BxT, input_segment_ids_BxS, causal=False)
    x_BxTxD = self.embedder.embed(tokens_BxT, positions_BxT)
    x_BxTxD = self.decoder(x_BxTxD, mask, positions_BxT, encoded_BxSxD, cross_mask)
    return self.embedder.logits(self.decoder_norm(x_BxTxD))

  def __call__(
    self,
    inputs_BxS: Array,
    decoder_inputs_BxT: Array,
    input_segment_ids_BxS: Array | None = None,
    input_positions_BxS: Array | None = None,
    segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None,
  ) -> Array:
    input_segment_ids_BxS, input_positions_BxS = default_segments(
      inputs_BxS, input_segment_ids_BxS, input_positions_BxS
    )
    encoded_BxSxD = self.encode(inputs_BxS, input_segment_ids_BxS, input_positions_BxS)
    return self.decode(encoded_BxSxD, input_segment_ids_BxS, decoder_inputs_BxT, segment_ids_BxT, positions_BxT)


class MlmHead(nn.Module):
  """BERT's masked-LM head (Hugging Face `BertOnlyMLMHead`): dense + GELU + LayerNorm, tied decoder + bias."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BxTxD: Array, embedder: layers.Embedder, segment_ids_BxT: Array | None = None) -> Array:
    cfg = self.cfg
    h_BxTxD = layers.dense(cfg.d_model, ("embed", "mlp"), cfg, "transform", use_bias=True)(x_BxTxD)
    # BERT's hidden_act "gelu" is the exact erf form, unlike GPT-2's tanh approximation.
    h_BxTxD = layers.Norm(cfg, name="transform_norm")(nn.gelu(h_BxTxD, approximate=False))
    bias_V = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
      (cfg.vocab_size,),
      layers.DTYPES[cfg.param_dtype],
    )
    return embedder.logits(h_BxTxD) + bias_V.astype(h_BxTxD.dtype)


class Encoder(nn.Module):
  """BERT: bidirectional encoder with token-type embeddings and a masked-LM head (or `head_cls`'s head, called
  as `head_cls(cfg)(x_BxTxD, embedder, segment_ids_BxT)`, e.g. `jaxlm.models.heads`' span or classifier head)."""

  cfg: ml_collections.ConfigDict
  decode: bool = False  # accepted for a uniform `build`; an encoder has nothing to cache
  deterministic: bool = True
  head_cls: Any = None  # None: MlmHead

  @nn.compact
  def __call__(
    self,
    tokens_BxT: Array,
    segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None,
    token_types_BxT: Array | None = None,
  ) -> Array:
    cfg = self.cfg
    segment_ids_BxT, positions_BxT = default_segments(tokens_BxT, segment_ids_BxT, positions_BxT)
    if cfg.num_token_types and token_types_BxT is None:
      token_types_BxT = jnp.zeros_like(tokens_BxT)  # BERT's single-sentence inputs are all type 0
    mask = layers.segment_mask(segment_ids_BxT, segment_ids_BxT, causal=False)
    embedder = layers.Embedder(cfg, self.deterministic, name="embedder")
    x_BxTxD = embedder.embed(tokens_BxT, positions_BxT, token_types_BxT)
    x_BxTxD = layers.Stack(
      cfg, cfg.num_layers, deterministic=self.deterministic, moe_mlp_cls=moe.MoeMlp, name="encoder"
    )(x_BxTxD, mask, positions_BxT)
    x_BxTxD = _final_norm(cfg, "final_norm")(x_BxTxD)
    head = MlmHead(cfg, name="mlm_head") if self.head_cls is None else self.head_cls(cfg, name="head")
    return head(x_BxTxD, embedder, segment_ids_BxT)


def model_inputs(model_cfg: ml_collections.ConfigDict, batch: dict) -> dict:
  """The keyword arguments of the `model_cfg.family` model's `__call__`, taken from a data batch."""
  return families.get(model_cfg.family).model_inputs(model_cfg, batch)


def example_batch(model_cfg: ml_collections.ConfigDict, shape: tuple[int, int]) -> dict:
  """A batch of the family's structure and `shape` (B, T), for initialization and tracing.

  Parameter shapes do not depend on the lengths, so an encoder-decoder uses
  `shape` on both sides here even when its data has a separate target length.
  """
  return families.get(model_cfg.family).example_batch(model_cfg, shape)


def attention_weights(model: nn.Module, params, *inputs, **named_inputs) -> list[Array]:
  """Every attention layer's weights, from the model as built: no config change, no rebuild.

  The model is applied with the 'attention_weights' collection mutable, which makes each `layers.Attention`
  run on XLA's code and sow softmax(q k^T / sqrt(H) + bias) over the keys it may read (masked keys get 0).
  The logits are the usual ones. Pure in (params, inputs): `jax.jit(functools.partial(attention_weights,
  model))` compiles it once for repeated calls.

  Args:
    model: a built model (`build`, `jaxlm.load(...).model`, or any module whose attention layers are
      `layers.Attention`).
    params: its parameters (the 'params' tree, or a variables dict holding one).
    *inputs, **named_inputs: the model's inputs, as `model.apply` takes them (e.g. `tokens_BxT`,
      `segment_ids_BxT=...`).

  Returns:
    One float32 B x N x T x S array per attention layer, in the order the model runs them: a decoder's
    layer 0 first; an encoder-decoder's encoder layers, then each decoder layer's self- then cross-attention.
    A scanned stack (`model.scan_layers`) gives the same list.
  """
  variables = params if "params" in params else {"params": params}
  _, state = model.apply(variables, *inputs, mutable=[layers.ATTENTION_WEIGHTS], **named_inputs)
  return _in_call_order(state.get(layers.ATTENTION_WEIGHTS, {}))


def _in_call_order(tree) -> list[Array]:
  """The sown weights of a collection tree, modules in insertion (call) order; a scanned stack ('layers', every
  leaf stacked on a leading layer axis) is unstacked layer by layer."""
  found = []
  for key, value in tree.items():
    if key == "attention_weights":
      found.extend(value)  # sow keeps a tuple: one entry per call
    elif key == "layers":
      stacked = _in_call_order(value)
      found.extend(weights[i] for i in range(stacked[0].shape[0]) for weights in stacked)
    else:
      found.extend(_in_call_order(value))
  return found


def build(model_cfg: ml_collections.ConfigDict, decode: bool = False, deterministic: bool = True) -> nn.Module:
  """The model of `model_cfg.family`, from the model sub-config `model_cfg` (`config.model`).

  `decode` builds it for cached generation; `deterministic=False` turns dropout on. Families are registered
  in `jaxlm.families`.
  """
  return families.get(model_cfg.family).build(model_cfg, decode=decode, deterministic=deterministic)
