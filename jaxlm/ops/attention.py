"""The attention op: softmax(q k^T / sqrt(H) + bias, masked) v, with one table of implementations.

Extension point. An attention implementation is a function

    fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT,
       kv_segment_ids_BxS, causal, model_cfg[, bias_BxNxTxS]) -> out_BxTxNxH

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
  bias_BxNxTxS:   only for implementations registered with `takes_bias=True`,
                  and only passed when there is a bias: a float array of shape
                  (B or 1, N or 1, T, S) added to the scaled scores before the
                  mask and the softmax (ALiBi, relative-position biases). An
                  implementation without `takes_bias` is refused with one line
                  naming `model.attention_impl` when a bias is given; the
                  automatic CPU kernels stand aside for "xla" instead.
  Returns out_BxTxNxH in v's dtype. Rows that see no key are never read by
  the loss; their values are unspecified.

Register it with `register_attention(name, fn, platforms=..., ...)` (see
`dispatch.Implementation`); `--config.model.attention_impl=NAME` then picks it
on those platforms (the config's allowed names are this registry's). With `needs_segment_ids=True` calls without segment ids
(decoding) use "xla" instead. An implementation may also carry
`extras={'packed': fn}`: self-attention that reads q, k and v in place from
the fused projection (see `packed_self_attention`).

Built in: "xla" (`xla_attention.dot_product_attention`, the reference, runs
anywhere, takes a bias), "cpu" (the fused float32 kernel of `cpu_kernels`,
chosen automatically on one CPU device; no bias: with one, "xla" runs) and
"cudnn" (`jax.nn.dot_product_attention` with implementation='cudnn', GPU only,
named by the config, takes a bias). splash and triton (`pallas_attention`)
take no bias.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from einops import repeat
from flax import struct

from jaxlm.errors import ConfigError
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
    bias_BxNxTxS: Array | None = None,
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
  takes_bias: bool = False,
):
  """Registers an attention implementation under `name`; `--config.model.attention_impl=NAME` then picks it.

  Args:
    name: the name the config uses.
    fn: an `AttentionFn` (the module docstring has the contract).
    platforms: target platforms it runs on; None runs anywhere (`dispatch.Implementation` has these five).
    dtypes: dtypes it computes in; None takes any.
    single_device: a custom call XLA cannot partition; stands aside on a mesh of more than one device.
    automatic: chosen without being named when its conditions hold.
    available: a check that it can run here at all (a kernel library built), called last.
    needs_segment_ids: calls without segment ids (decoding) run "xla" instead.
    packed: self-attention over the fused q|k|v projection (see `packed_self_attention`).
    takes_bias: `fn` accepts `bias_BxNxTxS` (an additive score bias such as ALiBi's).

  Returns:
    Its `dispatch.Implementation`.
  """
  extras = {"needs_segment_ids": needs_segment_ids, "takes_bias": takes_bias}
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


def _xla(
  q_BxTxNxH,
  k_BxSxKxH,
  v_BxSxKxH,
  *,
  mask_Bx1xTxS,
  q_segment_ids_BxT,
  kv_segment_ids_BxS,
  causal,
  model_cfg,
  bias_BxNxTxS=None,
):
  del q_segment_ids_BxT, kv_segment_ids_BxS, model_cfg
  return xla_attention.dot_product_attention(
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal=causal, bias_BxNxTxS=bias_BxNxTxS
  )


def _cpu(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  del q_segment_ids_BxT, kv_segment_ids_BxS, model_cfg
  b, t, s = q_BxTxNxH.shape[0], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  mask_BxTxS = jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, s))[:, 0].astype(bool)
  return cpu_kernels.attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, causal and t == s)


def _cpu_packed(qkv_BxTxCxH: Array, mask_Bx1xTxT: Array, causal: bool, num_heads: int) -> Array:
  b, t = qkv_BxTxCxH.shape[:2]
  mask_BxTxT = jnp.broadcast_to(mask_Bx1xTxT, (b, 1, t, t))[:, 0].astype(bool)
  return cpu_kernels.self_attention(qkv_BxTxCxH, mask_BxTxT, causal, num_heads)


def _cudnn(
  q_BxTxNxH,
  k_BxSxKxH,
  v_BxSxKxH,
  *,
  mask_Bx1xTxS,
  q_segment_ids_BxT,
  kv_segment_ids_BxS,
  causal,
  model_cfg,
  bias_BxNxTxS=None,
):
  del q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg  # the mask says it all
  return jax.nn.dot_product_attention(
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias_BxNxTxS, mask=mask_Bx1xTxS, implementation="cudnn"
  )


register_attention("xla", _xla, takes_bias=True)
register_attention(
  "cpu",
  _cpu,
  **cpu_kernels.WHERE_THEY_RUN,
  available=cpu_kernels.available,
  packed=_cpu_packed,
)
register_attention("cudnn", _cudnn, platforms=("gpu", "cuda"), dtypes=(jnp.bfloat16, jnp.float16), takes_bias=True)


def attention(
  q_BxTxNxH: Array,
  k_BxSxKxH: Array,
  v_BxSxKxH: Array,
  mask: Mask | Array,
  model_cfg,
  *,
  causal: bool = False,
  bias_BxNxTxS: Array | None = None,
) -> Array:
  """Attention through the implementation `dispatch.choose` picks.

  Args:
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: as in the module docstring.
    mask: a `Mask`, or the dense B x 1 x T x S boolean array alone (see `Mask` for the rules).
    model_cfg: the model sub-config (`model.attention_impl` and the kernels' settings).
    causal: the mask hides every key after its query (T == S).
    bias_BxNxTxS: None, or a float (B or 1) x (N or 1) x T x S bias added to the scaled scores.

  Returns:
    out_BxTxNxH in v's dtype. Raises ConfigError naming `model.attention_impl` when a bias is given to an
    implementation the config names that takes none.
  """
  if not isinstance(mask, Mask):
    mask = Mask(mask)
  name = dispatch.choose("attention", model_cfg, q_BxTxNxH.dtype)
  implementation = dispatch.REGISTRY["attention"][name]
  if implementation.extras.get("needs_segment_ids") and mask.q_segment_ids_BxT is None:
    name, implementation = "xla", dispatch.REGISTRY["attention"]["xla"]
  bias = {}
  if bias_BxNxTxS is not None:
    if not implementation.extras.get("takes_bias"):
      if not implementation.automatic:
        raise ConfigError(
          f"model.attention_impl={name!r} takes no attention bias, and this model adds one (model.position="
          f"{model_cfg.get('position')!r} or its attention class); set --config.model.attention_impl to one of "
          f"{', '.join(n for n, i in dispatch.REGISTRY['attention'].items() if i.extras.get('takes_bias'))}"
        )
      implementation = dispatch.REGISTRY["attention"]["xla"]  # an automatic kernel stands aside, as on a mesh
    bias = {"bias_BxNxTxS": bias_BxNxTxS}
  return implementation.fn(
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    mask_Bx1xTxS=mask.dense_Bx1xTxS,
    q_segment_ids_BxT=mask.q_segment_ids_BxT,
    kv_segment_ids_BxS=mask.kv_segment_ids_BxS,
    causal=causal,
    model_cfg=model_cfg,
    **bias,
  )


def packed_self_attention(model_cfg, dtype) -> Callable | None:
  """The chosen implementation's attention over the fused q|k|v projection, or None if it has none.

  The function takes (qkv_BxTxCxH with C = N + 2K heads: N query heads, then
  K key and K value heads, mask_Bx1xTxT, causal, num_heads) and returns
  out_BxTxNxH. It saves splitting the projection's output (and concatenating
  the gradients); callers use it for self-attention without RoPE or a cache.
  """
  return dispatch.implementation("attention", model_cfg, dtype).extras.get("packed")


def attention_weights(
  q_BxTxNxH: Array, k_BxSxKxH: Array, mask_Bx1xTxS: Array, bias_BxNxTxS: Array | None = None
) -> Array:
  """softmax(q k^T / sqrt(H) + bias) over the keys a query may read, as B x N x T x S float32, on XLA's code.

  The fused implementations never form these weights; this is for
  introspection (`jaxlm.attention_weights`). A row with no visible key
  is all zeros.
  """
  n, k = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
  k_BxSxNxH = repeat(k_BxSxKxH, "B S K H -> B S (K G) H", G=n // k)  # query head n reads kv head n // G
  logits_BxNxTxS = jnp.einsum("BTNH,BSNH->BNTS", q_BxTxNxH, k_BxSxNxH, preferred_element_type=jnp.float32)
  logits_BxNxTxS = logits_BxNxTxS * q_BxTxNxH.shape[-1] ** -0.5
  if bias_BxNxTxS is not None:
    logits_BxNxTxS = logits_BxNxTxS + bias_BxNxTxS.astype(jnp.float32)
  # A finite fill, not -inf: a row with no visible key must not turn into NaN, nor its gradient.
  weights_BxNxTxS = jax.nn.softmax(jnp.where(mask_Bx1xTxS, logits_BxNxTxS, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.where(mask_Bx1xTxS, weights_BxNxTxS, 0.0)


def attend_with_weights(weights_BxNxTxS: Array, v_BxSxKxH: Array) -> Array:
  """out_BxTxNxH = weights v for weights from `attention_weights`, in v's dtype."""
  n, k = weights_BxNxTxS.shape[1], v_BxSxKxH.shape[2]
  v_BxSxNxH = repeat(v_BxSxKxH, "B S K H -> B S (K G) H", G=n // k)
  out_BxTxNxH = jnp.einsum("BNTS,BSNH->BTNH", weights_BxNxTxS, v_BxSxNxH.astype(jnp.float32))
  return out_BxTxNxH.astype(v_BxSxKxH.dtype)
