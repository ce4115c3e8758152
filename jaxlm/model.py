"""Transformer families built from `jaxlm.layers`.

`DecoderLM` covers GPT-2 and LLaMA styles by config. Inputs follow one
convention across families: `segment_ids` (0 is padding, equal ids attend to
each other) and `positions` (restarting at 0 in every packed segment).
Shape letters are explained in `jaxlm.layers`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import layers

Array = jax.Array


def default_segments(tokens_BxT: Array, segment_ids_BxT: Array | None, positions_BxT: Array | None):
  """One unpadded segment per row when the caller gives none."""
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones_like(tokens_BxT)
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  return segment_ids_BxT, positions_BxT


class DecoderLM(nn.Module):
  """Decoder-only language model: tokens -> next-token logits.

  With `decode=True`, `cache_index_BxT` gives each query's cache slot so a
  prompt batch of mixed lengths decodes with per-row positions; the caller's
  `kv_segment_ids_BxS` marks which cache slots are filled.
  """
  cfg: ml_collections.ConfigDict
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens_BxT: Array, segment_ids_BxT: Array | None = None,
               positions_BxT: Array | None = None, cache_index_BxT: Array | None = None,
               kv_segment_ids_BxS: Array | None = None) -> Array:
    cfg = self.cfg
    segment_ids_BxT, positions_BxT = default_segments(tokens_BxT, segment_ids_BxT, positions_BxT)
    if self.decode and kv_segment_ids_BxS is not None:
      mask = layers.attention_mask(segment_ids_BxT, kv_segment_ids_BxS, causal=True,
                                   q_index_BxT=cache_index_BxT,
                                   kv_index_BxS=jnp.arange(kv_segment_ids_BxS.shape[1])[None])
    else:
      mask = layers.attention_mask(segment_ids_BxT, segment_ids_BxT, causal=True)
    embedder = layers.Embedder(cfg, self.deterministic, name="embedder")
    x_BxTxD = embedder.embed(tokens_BxT, positions_BxT)
    x_BxTxD = layers.Stack(cfg, cfg.num_layers, decode=self.decode, deterministic=self.deterministic,
                           name="decoder")(x_BxTxD, mask, positions_BxT)
    if cfg.norm_position == "pre":
      x_BxTxD = layers.Norm(cfg, name="final_norm")(x_BxTxD)
    return embedder.logits(x_BxTxD)


def model_inputs(cfg: ml_collections.ConfigDict, batch: dict) -> dict:
  """The keyword arguments of the family's `__call__`, taken from a data batch."""
  return {"tokens_BxT": batch["inputs"], "segment_ids_BxT": batch["segment_ids"],
          "positions_BxT": batch["positions"]}


def example_batch(cfg: ml_collections.ConfigDict, shape: tuple[int, int]) -> dict:
  """A batch of the family's structure and shape, for initialization and tracing."""
  ones = jnp.ones(shape, jnp.int32)
  return {"inputs": ones, "targets": ones, "segment_ids": ones,
          "positions": jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape),
          "weights": jnp.ones(shape, jnp.float32)}


def build(cfg: ml_collections.ConfigDict, decode: bool = False, deterministic: bool = True) -> nn.Module:
  """The model for `cfg.model.family`."""
  families = {"decoder": DecoderLM}
  if cfg.family not in families:
    raise ValueError(f"model.family '{cfg.family}' is not built yet; choose one of {sorted(families)}")
  return families[cfg.family](cfg, decode=decode, deterministic=deterministic)
