"""Task heads for `model.Encoder` and `model.DecoderLM` (their `head_cls`): span extraction and classification.

A head is called as `head(x_BxTxD, embedder, segment_ids_BxT)` on the final hidden states and returns logits
shaped so the trainer's token cross-entropy applies unchanged: B x 2 x T for a span (row 0 scores each
position as the answer's start, row 1 as its end; targets B x 2), B x 1 x C for a class (targets B x 1).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from einops import rearrange

from jaxlm.models import layers

Array = jax.Array
_MASKED = -1e9  # a logit softmax gives no weight to: padding is never a span end point


class SpanHead(nn.Module):
  """BERT's SQuAD head (Devlin et al., 2019, section 4.2): one dense layer to start and end logits, B x 2 x T;
  padding positions (segment id 0) get a large negative logit."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BxTxD: Array, embedder=None, segment_ids_BxT: Array | None = None) -> Array:
    logits_BxTx2 = layers.dense(2, ("embed", None), self.cfg, "span", use_bias=True)(x_BxTxD)
    logits_Bx2xT = rearrange(logits_BxTx2, "b t ends -> b ends t").astype(jnp.float32)
    if segment_ids_BxT is not None:
      logits_Bx2xT = jnp.where(segment_ids_BxT[:, None, :] != 0, logits_Bx2xT, _MASKED)
    return logits_Bx2xT


class ClassifierHead(nn.Module):
  """Sequence classification: one position's hidden state -> tanh dense (BERT's pooler) -> `cfg.num_classes`
  logits, B x 1 x C. `pool='first'` reads position 0 ([CLS], the encoder's); `pool='last'` the last non-padding
  position (the decoder's, which has seen the whole sequence only there)."""

  cfg: ml_collections.ConfigDict
  pool: str = "first"

  @nn.compact
  def __call__(self, x_BxTxD: Array, embedder=None, segment_ids_BxT: Array | None = None) -> Array:
    cfg = self.cfg
    if self.pool == "first" or segment_ids_BxT is None:
      index_B = jnp.zeros(x_BxTxD.shape[0], jnp.int32)
    else:  # rows are left-aligned: the last real token sits at (number of real tokens - 1)
      index_B = jnp.maximum(jnp.sum(segment_ids_BxT != 0, axis=1) - 1, 0)
    pooled_BxD = jnp.take_along_axis(x_BxTxD, index_B[:, None, None], axis=1)[:, 0]
    pooled_BxD = jnp.tanh(layers.dense(cfg.d_model, ("embed", "mlp"), cfg, "pooler", use_bias=True)(pooled_BxD))
    logits_BxC = layers.dense(cfg.num_classes, ("mlp", None), cfg, "classifier", use_bias=True)(pooled_BxD)
    return logits_BxC[:, None, :].astype(jnp.float32)


FirstTokenClassifier = functools.partial(ClassifierHead, pool="first")
LastTokenClassifier = functools.partial(ClassifierHead, pool="last")
