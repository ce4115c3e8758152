"""Attention on XLA's own code: the block-causal core with a hand-written backward.

The "xla" implementation of `jaxlm.ops.attention`, and the reference every
other implementation is tested against. Shape letters as in `jaxlm.models.layers`;
G is a GQA group (N // K query heads per key/value head), Q stands for a
block's query rows with a group folded in.
"""

import jax
import jax.numpy as jnp
from einops import rearrange, repeat

Array = jax.Array


_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's value: a fully masked row averages V
_CAUSAL_BLOCKS = 4  # query blocks of causal self-attention; 4 measured fastest at T=256 (BENCHMARKS.md)


def dot_product_attention(
  q_BxTxNxH: Array,
  k_BxSxKxH: Array,
  v_BxSxKxH: Array,
  mask_Bx1xTxS: Array,
  causal: bool = False,
  bias_BxNxTxS: Array | None = None,
) -> Array:
  """softmax(q k^T / sqrt(H) + bias, masked) v, equal to `jax.nn.dot_product_attention` up to float32 rounding.

  `bias_BxNxTxS` (optional, B or 1 x N or 1 x T x S) is added to the scaled
  scores in float32; it gets its gradient like any input.

  Written for CPU, where XLA does not fuse attention (BENCHMARKS.md has the
  measurements): heads move in front of the sequence once, with a GQA group
  folded into the query rows; the scale multiplies q (T x H) rather than the
  logits (T x S); and `_attention` has a hand-written backward pass.

  `causal=True` promises that the mask hides every key after its query
  (s > t, with T == S), as in decoder self-attention. The queries are then cut
  into `_CAUSAL_BLOCKS` blocks and each block attends only to the keys up to
  its own end, so the forward and backward passes skip 3/8 of the T x S work.
  The one visible difference: a query that sees no key at all (padding) gets
  the mean of the values up to its block's end instead of all values; losses
  give padding weight 0, so no gradient changes.
  """
  b, t, n, h = q_BxTxNxH.shape
  s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  g = n // k
  # Query head n reads key/value head n // G: the heads split into (K, G).
  q_BxKxGxTxH = rearrange(q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype), "B T (K G) H -> B K G T H", K=k)
  k_BxKxSxH = rearrange(k_BxSxKxH, "B S K H -> B K S H")
  v_BxKxSxH = rearrange(v_BxSxKxH, "B S K H -> B K S H")
  if bias_BxNxTxS is not None:
    # Heads split into (K, G) as for q; a bias shared by all heads (N = 1) stays shared (K = G = 1).
    bias_BxKxGxTxS = rearrange(bias_BxNxTxS, "B (K G) T S -> B K G T S", K=k if bias_BxNxTxS.shape[1] > 1 else 1)
  blocks = _CAUSAL_BLOCKS if causal and t == s and t % _CAUSAL_BLOCKS == 0 else 1
  size = t // blocks
  outs = []
  for i in range(blocks):
    rows, end = slice(i * size, (i + 1) * size), (s if blocks == 1 else (i + 1) * size)
    # einsum letters in `_attention`: Q stands for the G x size query rows of this block.
    q_BxKxQxH = rearrange(q_BxKxGxTxH[:, :, :, rows], "B K G Q H -> B K (G Q) H")
    mask_Bx1xQxS = repeat(jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, s))[:, :, rows, :end], "B O T S -> B O (G T) S", G=g)
    bias_BxKxQxS = None
    if bias_BxNxTxS is not None:
      bias_BxKxGxQxS = bias_BxKxGxTxS[:, :, :, rows, :end]
      bias_BxKxGxQxS = jnp.broadcast_to(bias_BxKxGxQxS, bias_BxKxGxQxS.shape[:2] + (g,) + bias_BxKxGxQxS.shape[3:])
      bias_BxKxQxS = rearrange(bias_BxKxGxQxS, "B K G Q S -> B K (G Q) S").astype(jnp.float32)
    out_BxKxQxH = _attention(q_BxKxQxH, k_BxKxSxH[:, :, :end], v_BxKxSxH[:, :, :end], mask_Bx1xQxS, bias_BxKxQxS)
    outs.append(rearrange(out_BxKxQxH, "B K (G Q) H -> B K G Q H", G=g))
  out_BxKxGxTxH = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
  return rearrange(out_BxKxGxTxH, "B K G T H -> B T (K G) H")


@jax.custom_vjp
def _attention(
  q_BxKxQxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_Bx1xQxS: Array, bias_BxKxQxS: Array | None
) -> Array:
  """Heads-first attention core (q already scaled; bias float32, B and K possibly 1, or None); see
  `_attention_forward`."""
  return _attention_forward(q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, bias_BxKxQxS)[0]


def _attention_forward(q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, bias_BxKxQxS):
  """The softmax normalization divides the output (Q x H), not the weights (Q x S)."""
  logits_BxKxQxS = jnp.einsum("BKQH,BKSH->BKQS", q_BxKxQxH, k_BxKxSxH, preferred_element_type=jnp.float32)
  if bias_BxKxQxS is not None:
    logits_BxKxQxS = logits_BxKxQxS + bias_BxKxQxS
  logits_BxKxQxS = jnp.where(mask_Bx1xQxS, logits_BxKxQxS, _MASKED_LOGIT)
  weights_BxKxQxS = jnp.exp(logits_BxKxQxS - jnp.max(logits_BxKxQxS, axis=-1, keepdims=True))
  row_sum_BxKxQx1 = jnp.sum(weights_BxKxQxS, axis=-1, keepdims=True)
  out_BxKxQxH = (
    jnp.einsum(
      "BKQS,BKSH->BKQH", weights_BxKxQxS.astype(v_BxKxSxH.dtype), v_BxKxSxH, preferred_element_type=jnp.float32
    )
    / row_sum_BxKxQx1
  )
  residuals = (q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, out_BxKxQxH, weights_BxKxQxS, row_sum_BxKxQx1)
  return out_BxKxQxH.astype(v_BxKxSxH.dtype), (residuals, bias_BxKxQxS)


def _attention_backward(residuals_and_bias, d_out_BxKxQxH):
  """The softmax gradient P(dP - rowsum(P dP)) with rowsum(P dP) = rowsum(dO O): a Q x H product, not Q x S.

  Autodiff of the forward gets the same values but made the train step about
  6% slower (BENCHMARKS.md).
  """
  residuals, bias_BxKxQxS = residuals_and_bias  # the bias only for its shape
  q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, out_BxKxQxH, weights_BxKxQxS, row_sum_BxKxQx1 = residuals
  dtype = v_BxKxSxH.dtype
  # Gradient w.r.t. the unnormalized weights' product, since `weights` are unnormalized.
  d_out_BxKxQxH = d_out_BxKxQxH.astype(jnp.float32) / row_sum_BxKxQx1
  d_v_BxKxSxH = jnp.einsum(
    "BKQS,BKQH->BKSH", weights_BxKxQxS.astype(dtype), d_out_BxKxQxH.astype(dtype), preferred_element_type=jnp.float32
  )
  d_weights_BxKxQxS = jnp.einsum(
    "BKQH,BKSH->BKQS", d_out_BxKxQxH.astype(dtype), v_BxKxSxH, preferred_element_type=jnp.float32
  )
  row_dot_BxKxQx1 = jnp.sum(d_out_BxKxQxH * out_BxKxQxH, axis=-1, keepdims=True)
  # Masked logits get no gradient, also in a fully masked row, whose weights are all 1.
  d_logits_BxKxQxS = jnp.where(mask_Bx1xQxS, weights_BxKxQxS * (d_weights_BxKxQxS - row_dot_BxKxQx1), 0.0)
  d_bias = None
  if bias_BxKxQxS is not None:  # the bias's gradient is the logits', summed over the axes it was broadcast along
    shape = bias_BxKxQxS.shape
    summed = tuple(axis for axis, size in enumerate(shape) if size == 1 and d_logits_BxKxQxS.shape[axis] > 1)
    d_bias = jnp.sum(d_logits_BxKxQxS, axis=summed, keepdims=True)
  d_logits_BxKxQxS = d_logits_BxKxQxS.astype(q_BxKxQxH.dtype)
  d_q_BxKxQxH = jnp.einsum("BKQS,BKSH->BKQH", d_logits_BxKxQxS, k_BxKxSxH, preferred_element_type=jnp.float32)
  d_k_BxKxSxH = jnp.einsum("BKQS,BKQH->BKSH", d_logits_BxKxQxS, q_BxKxQxH, preferred_element_type=jnp.float32)
  return (
    d_q_BxKxQxH.astype(q_BxKxQxH.dtype),
    d_k_BxKxSxH.astype(k_BxKxSxH.dtype),
    d_v_BxKxSxH.astype(dtype),
    None,
    d_bias,
  )


_attention.defvjp(_attention_forward, _attention_backward)
