"""The attention op: softmax(q k^T / sqrt(H), masked) v, with one table of implementations.

Extension point. An attention implementation is a function

    fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT,
       kv_segment_ids_BxS, causal, model_cfg) -> out_BxTxNxH

  q, k, v:        the compute dtype; K divides N (grouped-query attention:
                  query head n reads key/value head n // (N // K)). q is not
                  scaled: the implementation scales by 1/sqrt(H).
  mask_Bx1xTxS:   boolean, True where a query may read a key. Always given and
                  always the truth; implementations that build masks blockwise
                  from segment ids may ignore it when segment ids are given.
  q_segment_ids_BxT, kv_segment_ids_BxS: int32 or None. When given, the mask
                  is exactly "same segment and neither is 0 (padding)", and
                  also "key index <= query index" when `causal`. None when
                  the mask is anything else (decoding against the cache).
  causal:         the mask hides every key after its query (T == S).
  model_cfg:      the model sub-config, for implementation settings.
  Returns out_BxTxNxH in v's dtype. Rows that see no key are never read by
  the loss; their values are unspecified.

Register it with `register_attention(name, fn, platforms=..., ...)` (see
`dispatch.Implementation`); `--config.model.attention_impl=NAME` then picks it
on those platforms (the config's allowed names are this registry's). With `needs_segment_ids=True` calls without segment ids
(decoding) use "xla" instead. An implementation may also carry
`extras={'packed': fn}`: self-attention that reads q, k and v in place from
the fused projection (see `packed_self_attention`).

Built in: "xla" (`xla_attention.dot_product_attention`, the reference, runs
anywhere), "cpu" (the fused float32 kernel of `cpu_kernels`, chosen
automatically on one CPU device) and "cudnn" (`jax.nn.dot_product_attention`
with implementation='cudnn', GPU only, named by the config).
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from einops import repeat
from flax import struct

from jaxlm.ops import cpu_kernels, dispatch, xla_attention

Array = jax.Array


@struct.dataclass
class Mask:
  """What attention may read: the dense boolean mask, and the segment ids it was built from when it is
  exactly "same segment, neither 0, and causal by row index if causal" (else None; see the module docstring)."""

  dense_Bx1xTxS: Array
  q_segment_ids_BxT: Array | None = None
  kv_segment_ids_BxS: Array | None = None


class AttentionFn(Protocol):
  """The signature every attention implementation has (see the module docstring)."""

  def __call__(
    self,
    q_BxTxNxH: Array,
    k_BxSxKxH: Array,
    v_BxSxKxH: Array,
    *,
    mask_Bx1xTxS: Array,
    q_segment_ids_BxT: Array | None,
    kv_segment_ids_BxS: Array | None,
    causal: bool,
    model_cfg,
  ) -> Array: ...


def register_attention(
  name: str,
  fn: AttentionFn,
  *,
  platforms: tuple[str, ...] | None = None,
  dtypes: tuple | None = None,
  needs_segment_ids: bool = False,
  single_device: bool = False,
  automatic: bool = False,
  available: Callable[[], bool] = lambda: True,
  packed: Callable | None = None,
):
  """Registers an attention implementation under `name`; returns its `dispatch.Implementation`."""
  extras = {"needs_segment_ids": needs_segment_ids}
  if packed is not None:
    extras["packed"] = packed
  return dispatch.register(
    "attention",
    name,
    dispatch.Implementation(
      fn,
      platforms=platforms,
      dtypes=dtypes,
      single_device=single_device,
      automatic=automatic,
      available=available,
      extras=extras,
    ),
  )


def _xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  del q_segment_ids_BxT, kv_segment_ids_BxS, model_cfg
  return xla_attention.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal=causal)


def _cpu(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  del q_segment_ids_BxT, kv_segment_ids_BxS, model_cfg
  b, t, s = q_BxTxNxH.shape[0], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  mask_BxTxS = jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, s))[:, 0].astype(bool)
  return cpu_kernels.attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal and t == s)


def _cpu_packed(qkv_BxTxCxH: Array, mask_Bx1xTxT: Array, causal: bool, num_heads: int) -> Array:
  b, t = qkv_BxTxCxH.shape[:2]
  mask_BxTxT = jnp.broadcast_to(mask_Bx1xTxT, (b, 1, t, t))[:, 0].astype(bool)
  return cpu_kernels.self_attention(qkv_BxTxCxH, mask_BxTxT, causal, num_heads)


def _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  del q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg  # the mask says it all
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, implementation="cudnn")


register_attention("xla", _xla)
register_attention(
  "cpu",
  _cpu,
  **cpu_kernels.WHERE_THEY_RUN,
  available=cpu_kernels.available,
  packed=_cpu_packed,
)
register_attention("cudnn", _cudnn, platforms=("gpu", "cuda"), dtypes=(jnp.bfloat16, jnp.float16))


def attention(
  q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask | Array, model_cfg, *, causal: bool = False
) -> Array:
  """out_BxTxNxH through the implementation `dispatch.choose` picks (arguments as in the module docstring;
  `mask` is a `Mask` or the dense B x 1 x T x S boolean array alone)."""
  if not isinstance(mask, Mask):
    mask = Mask(mask)
  implementation = dispatch.implementation("attention", model_cfg, q_BxTxNxH.dtype)
  if implementation.extras.get("needs_segment_ids") and mask.q_segment_ids_BxT is None:
    implementation = dispatch.REGISTRY["attention"]["xla"]
  return implementation.fn(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    mask_Bx1xTxS=mask.dense_Bx1xTxS,
    q_segment_ids_BxT=mask.q_segment_ids_BxT,
    kv_segment_ids_BxS=mask.kv_segment_ids_BxS,
    causal=causal,
    model_cfg=model_cfg,
  )


def packed_self_attention(model_cfg, dtype) -> Callable | None:
  """The chosen implementation's attention over the fused q|k|v projection, or None if it has none.

  The function takes (qkv_BxTxCxH with C = N + 2K heads: N query heads, then
  K key and K value heads, mask_Bx1xTxT, causal, num_heads) and returns
  out_BxTxNxH. It saves splitting the projection's output (and concatenating
  the gradients); callers use it for self-attention without RoPE or a cache.
  """
  return dispatch.implementation("attention", model_cfg, dtype).extras.get("packed")


def attention_weights(q_BxTxNxH: Array, k_BxSxKxH: Array, mask_Bx1xTxS: Array) -> Array:
  """softmax(q k^T / sqrt(H)) over the keys a query may read, as B x N x T x S float32, on XLA's code.

  The fused implementations never form these weights; this is for
  introspection (`model.sow_attention_weights`). A row with no visible key
  is all zeros.
  """
  n, k = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
  k_BxSxNxH = repeat(k_BxSxKxH, "B S K H -> B S (K G) H", G=n // k)  # query head n reads kv head n // G
  logits_BxNxTxS = jnp.einsum("BTNH,BSNH->BNTS", q_BxTxNxH, k_BxSxNxH, preferred_element_type=jnp.float32)
  logits_BxNxTxS = logits_BxNxTxS * q_BxTxNxH.shape[-1] ** -0.5
  # A finite fill, not -inf: a row with no visible key must not turn into NaN, nor its gradient.
  weights_BxNxTxS = jax.nn.softmax(jnp.where(mask_Bx1xTxS, logits_BxNxTxS, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.where(mask_Bx1xTxS, weights_BxNxTxS, 0.0)


def attend_with_weights(weights_BxNxTxS: Array, v_BxSxKxH: Array) -> Array:
  """out_BxTxNxH = weights v for weights from `attention_weights`, in v's dtype."""
  n, k = weights_BxNxTxS.shape[1], v_BxSxKxH.shape[2]
  v_BxSxNxH = repeat(v_BxSxKxH, "B S K H -> B S (K G) H", G=n // k)
  out_BxTxNxH = jnp.einsum("BNTS,BSNH->BTNH", weights_BxNxTxS, v_BxSxNxH.astype(jnp.float32))
  return out_BxTxNxH.astype(v_BxSxKxH.dtype)
