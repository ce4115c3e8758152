"""Attention on XLA's own code: the block-causal core with a hand-written backward.

`layers.Attention` calls `dot_product_attention`; on CPU in float32 it hands
the work to the fused kernel of `cpu_kernels` instead. Shape letters as in
`layers`; Q stands for a block's query rows with a GQA group folded in.
"""

import jax
import jax.numpy as jnp

from jaxlm import cpu_kernels

Array = jax.Array


_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's value: a fully masked row averages V
_CAUSAL_BLOCKS = 4  # query blocks of causal self-attention; 4 measured fastest at T=256 (BENCHMARKS.md)


def dot_product_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_Bx1xTxS: Array,
                          causal: bool = False, cpu_kernel: bool = True) -> Array:
  """softmax(q k^T / sqrt(H), masked) v, equal to `jax.nn.dot_product_attention` up to float32 rounding.

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

  With `cpu_kernel`, on the CPU backend in float32, the fused kernel of
  `cpu_kernels` runs instead (2.4x faster than this XLA code at the reference
  config); it reads jaxlm's layouts directly and gives padding queries the
  mean of all values, as jax.nn does.
  """
  b, t, n, h = q_BxTxNxH.shape
  s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if cpu_kernel and cpu_kernels.usable(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH):
    mask_BxTxS = jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, s))[:, 0].astype(bool)
    return cpu_kernels.attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal and t == s)
  g = n // k
  q_BxKxGxTxH = (q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  blocks = _CAUSAL_BLOCKS if causal and t == s and t % _CAUSAL_BLOCKS == 0 else 1
  size = t // blocks
  outs = []
  for i in range(blocks):
    rows, end = slice(i * size, (i + 1) * size), (s if blocks == 1 else (i + 1) * size)
    # einsum letters in `_attention`: Q stands for the G x size query rows of this block.
    q_BxKxQxH = q_BxKxGxTxH[:, :, :, rows].reshape(b, k, g * size, h)
    mask_Bx1xQxS = jnp.broadcast_to(mask_Bx1xTxS[:, :, None, rows, :end], (b, 1, g, size, end)).reshape(b, 1, g * size, end)
    out_BxKxQxH = _attention(q_BxKxQxH, k_BxKxSxH[:, :, :end], v_BxKxSxH[:, :, :end], mask_Bx1xQxS)
    outs.append(out_BxKxQxH.reshape(b, k, g, size, h))
  out_BxKxGxTxH = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
  return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@jax.custom_vjp
def _attention(q_BxKxQxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_Bx1xQxS: Array) -> Array:
  """Heads-first attention core (q already scaled); see `_attention_forward`."""
  return _attention_forward(q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS)[0]


def _attention_forward(q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS):
  """The softmax normalization divides the output (Q x H), not the weights (Q x S)."""
  logits_BxKxQxS = jnp.einsum("BKQH,BKSH->BKQS", q_BxKxQxH, k_BxKxSxH, preferred_element_type=jnp.float32)
  logits_BxKxQxS = jnp.where(mask_Bx1xQxS, logits_BxKxQxS, _MASKED_LOGIT)
  weights_BxKxQxS = jnp.exp(logits_BxKxQxS - jnp.max(logits_BxKxQxS, axis=-1, keepdims=True))
  row_sum_BxKxQx1 = jnp.sum(weights_BxKxQxS, axis=-1, keepdims=True)
  out_BxKxQxH = jnp.einsum("BKQS,BKSH->BKQH", weights_BxKxQxS.astype(v_BxKxSxH.dtype), v_BxKxSxH,
                           preferred_element_type=jnp.float32) / row_sum_BxKxQx1
  residuals = (q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, out_BxKxQxH, weights_BxKxQxS, row_sum_BxKxQx1)
  return out_BxKxQxH.astype(v_BxKxSxH.dtype), residuals


def _attention_backward(residuals, d_out_BxKxQxH):
  """The softmax gradient P(dP - rowsum(P dP)) with rowsum(P dP) = rowsum(dO O): a Q x H product, not Q x S.

  Autodiff of the forward gets the same values but made the train step about
  6% slower (BENCHMARKS.md).
  """
  q_BxKxQxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xQxS, out_BxKxQxH, weights_BxKxQxS, row_sum_BxKxQx1 = residuals
  dtype = v_BxKxSxH.dtype
  # Gradient w.r.t. the unnormalized weights' product, since `weights` are unnormalized.
  d_out_BxKxQxH = d_out_BxKxQxH.astype(jnp.float32) / row_sum_BxKxQx1
  d_v_BxKxSxH = jnp.einsum("BKQS,BKQH->BKSH", weights_BxKxQxS.astype(dtype), d_out_BxKxQxH.astype(dtype),
                           preferred_element_type=jnp.float32)
  d_weights_BxKxQxS = jnp.einsum("BKQH,BKSH->BKQS", d_out_BxKxQxH.astype(dtype), v_BxKxSxH,
                                 preferred_element_type=jnp.float32)
  row_dot_BxKxQx1 = jnp.sum(d_out_BxKxQxH * out_BxKxQxH, axis=-1, keepdims=True)
  # Masked logits get no gradient, also in a fully masked row, whose weights are all 1.
  d_logits_BxKxQxS = jnp.where(mask_Bx1xQxS, weights_BxKxQxS * (d_weights_BxKxQxS - row_dot_BxKxQx1), 0.0)
  d_logits_BxKxQxS = d_logits_BxKxQxS.astype(q_BxKxQxH.dtype)
  d_q_BxKxQxH = jnp.einsum("BKQS,BKSH->BKQH", d_logits_BxKxQxS, k_BxKxSxH, preferred_element_type=jnp.float32)
  d_k_BxKxSxH = jnp.einsum("BKQS,BKQH->BKSH", d_logits_BxKxQxS, q_BxKxQxH, preferred_element_type=jnp.float32)
  return (d_q_BxKxQxH.astype(q_BxKxQxH.dtype), d_k_BxKxSxH.astype(k_BxKxSxH.dtype),
          d_v_BxKxSxH.astype(dtype), None)


_attention.defvjp(_attention_forward, _attention_backward)
