"""The Transformer layers that every family is built from.

Shape letters, used in tensor names throughout jaxlm:
  B batch, T query length, S key/value length, D d_model, N query heads,
  K key/value heads, H head dimension, F MLP hidden size, V vocabulary.

Every parameter carries logical axis names; `jaxlm.parallel.sharding` maps them onto
the mesh through the rules table in the config. The computation goes through
`jaxlm.ops` (attention, norm, dense, activation), which chooses the kernels;
nothing here depends on the backend.

Extension points: `Stack` takes the block class (`Block`, `ParallelBlock` or
your own subclass), and blocks take the attention and MLP classes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from einops import rearrange

from jaxlm import config as config_lib
from jaxlm import ops

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_kernel_init = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


def dense(
  features, axes: tuple[str, ...], cfg, name: str, in_axis: int | tuple = -1, use_bias: bool | None = None
) -> nn.DenseGeneral:
  """DenseGeneral whose kernel and bias carry the logical names `axes` (inputs first)."""
  features = features if isinstance(features, tuple) else (features,)
  use_bias = cfg.use_bias if use_bias is None else use_bias
  return nn.DenseGeneral(
    features,
    axis=in_axis,
    use_bias=use_bias,
    name=name,
    dtype=DTYPES[cfg.dtype],
    param_dtype=DTYPES[cfg.param_dtype],
    kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
    bias_init=nn.with_logical_partitioning(_zeros, axes[-len(features) :]),
  )


class DenseParams(nn.Module):
  """The kernel and bias that `dense` would create, returned instead of applied.

  The parameters are identical to `dense`'s (same names, shapes, logical axes and
  initial values, as DenseGeneral also draws its kernel flattened to 2-D), so
  callers can fuse several projections into one matmul without changing the
  parameter tree that checkpoints and the Hugging Face conversion read.
  """

  in_features: tuple[int, ...]
  features: tuple[int, ...]
  axes: tuple[str, ...]
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self) -> tuple[Array, Array | None]:
    dtype = DTYPES[self.cfg.param_dtype]
    shape = self.in_features + self.features
    flat = (math.prod(self.in_features), math.prod(self.features))
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(lambda rng, _, dt: _kernel_init(rng, flat, dt).reshape(shape), self.axes),
      shape,
      dtype,
    )
    bias = None
    if self.cfg.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(_zeros, self.axes[-len(self.features) :]), self.features, dtype
      )
    return kernel, bias


class Norm(nn.Module):
  """LayerNorm or RMSNorm whose statistics are computed in float32."""

  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.cfg
    x = x_BxTxD.astype(jnp.float32)
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), DTYPES[cfg.param_dtype]
    )
    bias = None
    if cfg.norm != "rmsnorm" and cfg.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(_zeros, ("norm",)), (x.shape[-1],), DTYPES[cfg.param_dtype]
      )
    y = ops.norm.norm(x, scale, bias, cfg)
    return y.astype(DTYPES[cfg.dtype])


def rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float) -> Array:
  """Rotary embedding with the half-split rotation of Hugging Face's Llama (`rotate_half`)."""
  half = x_BxTxNxH.shape[-1] // 2
  inv_freq_H2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_H2
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def sinusoidal(positions_BxT: Array, d_model: int) -> Array:
  """The fixed positional encoding of Vaswani et al. (2017), section 3.5."""
  half = d_model // 2
  inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxTxD2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  return jnp.concatenate([jnp.sin(angles_BxTxD2), jnp.cos(angles_BxTxD2)], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al., 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads.

  For a head count that is not a power of two, as in the paper's code and BLOOM: the slopes of the power of two
  below it, then every other slope of twice that power, until there are `num_heads`.

  Args:
    num_heads: the number of query heads N.

  Returns:
    float32 array of N slopes, largest first.
  """
  power = 2 ** math.floor(math.log2(num_heads))
  geometric = lambda n: [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  slopes = geometric(power) + geometric(2 * power)[0::2][: num_heads - power]
  return np.asarray(slopes, np.float32)


def alibi_bias(q_positions_BxT: Array, kv_positions_BxS: Array, num_heads: int) -> Array:
  """ALiBi's attention bias, float32 B x N x T x S: -slope_n * |query position - key position|.

  Causal attention only reads keys at or before the query, where this is Press et al.'s -slope * (t - s); BLOOM's
  slope * s differs from it by a constant per query row, which the softmax cancels. Encoders get the symmetric
  distance.
  """
  distance_BxTxS = jnp.abs(q_positions_BxT[:, :, None] - kv_positions_BxS[:, None, :]).astype(jnp.float32)
  return -jnp.asarray(alibi_slopes(num_heads))[None, :, None, None] * distance_BxTxS[:, None]


def attention_mask(
  q_segment_BxT: Array,
  kv_segment_BxS: Array,
  causal: bool,
  q_index_BxT: Array | None = None,
  kv_index_BxS: Array | None = None,
) -> Array:
  """Boolean B x 1 x T x S mask: same segment, neither side padding (segment 0), and causal.

  Causality is by index within the row (or the cache slot while decoding), so
  packed documents, whose segments never match, cannot see each other.
  """
  mask = q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :]
  mask &= (q_segment_BxT[:, :, None] != 0) & (kv_segment_BxS[:, None, :] != 0)
  if causal:
    if q_index_BxT is None:
      q_index_BxT = jnp.arange(q_segment_BxT.shape[1])[None]
    if kv_index_BxS is None:
      kv_index_BxS = jnp.arange(kv_segment_BxS.shape[1])[None]
    mask &= q_index_BxT[:, :, None] >= kv_index_BxS[:, None, :]
  return mask[:, None]


def segment_mask(q_segment_BxT: Array, kv_segment_BxS: Array, causal: bool) -> ops.attention.Mask:
  """`attention_mask` by row index, together with the segment ids it was built from (`ops.attention.Mask`),
  so attention implementations that build their masks blockwise can use them."""
  return ops.attention.Mask(attention_mask(q_segment_BxT, kv_segment_BxS, causal), q_segment_BxT, kv_segment_BxS)


# The collection `Attention` sows its weights into when an apply makes it mutable (`jaxlm.attention_weights`).
ATTENTION_WEIGHTS = "attention_weights"


class Attention(nn.Module):
  """Multi-head, grouped-query or multi-query attention; self or cross.

  `kv_BxSxD` switches to cross-attention. With `decode=True` keys and values
  are appended to a static-shape cache in the 'cache' collection, so one
  compiled decode step serves every position. `causal=True` declares that the
  mask hides later keys. `mask` is a boolean B x 1 x T x S array or an
  `ops.attention.Mask`. The attention itself runs through `ops.attention`,
  with the additive bias of `score_bias` (ALiBi for `model.position='alibi'`).

  Attention weights: applied with the 'attention_weights' collection mutable
  (`mutable=['attention_weights']`, what `jaxlm.attention_weights` does), or
  with `model.sow_attention_weights` (into 'intermediates'), the layer runs on
  XLA's code and sows its B x N x T x S weights as 'attention_weights'.
  """

  cfg: ml_collections.ConfigDict
  decode: bool = False
  deterministic: bool = True
  causal: bool = False

  def score_bias(self, q_positions_BxT: Array, kv_positions_BxS: Array | None) -> Array | None:
    """The bias self-attention adds to its scaled scores, float (B or 1) x (N or 1) x T x S, or None.

    Extension point: override it in an `attention_cls` for another bias (the implementation must take one:
    xla and cudnn do). While decoding, `kv_positions_BxS` are the cached keys' positions, kept in the cache
    only for `model.position='alibi'` (else None).

    Args:
      q_positions_BxT: the queries' positions (restarting at 0 in every packed segment).
      kv_positions_BxS: the keys' positions.

    Returns:
      ALiBi's bias (`alibi_bias`) for `model.position='alibi'`, else None.
    """
    if self.cfg.position == "alibi":
      return alibi_bias(q_positions_BxT, kv_positions_BxS, self.cfg.num_heads)
    return None

  @nn.compact
  def __call__(
    self,
    x_BxTxD: Array,
    mask: Array | ops.attention.Mask,
    positions_BxT: Array | None = None,
    kv_BxSxD: Array | None = None,
  ) -> Array:
    cfg = self.cfg
    if not isinstance(mask, ops.attention.Mask):
      mask = ops.attention.Mask(mask)
    num_heads, num_kv, hd = cfg.num_heads, config_lib.num_kv_heads(cfg), config_lib.head_dim(cfg)
    is_cross = kv_BxSxD is not None
    kv_in = kv_BxSxD if is_cross else x_BxTxD
    dtype, d = DTYPES[cfg.dtype], x_BxTxD.shape[-1]
    query = DenseParams((d,), (num_heads, hd), ("embed", "heads", "head_dim"), cfg, name="query")()
    key = DenseParams((kv_in.shape[-1],), (num_kv, hd), ("embed", "kv_heads", "head_dim"), cfg, name="key")()
    value = DenseParams((kv_in.shape[-1],), (num_kv, hd), ("embed", "kv_heads", "head_dim"), cfg, name="value")()
    sow = self._weights_collection()
    bias_BxNxTxS = None if is_cross or self.decode else self.score_bias(positions_BxT, positions_BxT)
    packed = ops.attention.packed_self_attention(cfg, dtype)
    fused = not is_cross and not self.decode and cfg.position != "rope" and not sow and bias_BxNxTxS is None
    if packed is not None and fused:  # the packed kernels take no bias
      qkv_BxTxC = ops.projection(x_BxTxD, [query, key, value], dtype, cfg, split=False)
      qkv_BxTxCxH = rearrange(qkv_BxTxC, "B T (C H) -> B T C H", H=hd)  # C = N query, K key, K value heads
      return self._output(packed(qkv_BxTxCxH, mask.dense_Bx1xTxS, self.causal, num_heads))
    if is_cross:
      (q_BxTxNxH,) = ops.projection(x_BxTxD, [query], dtype, cfg)
      k_BxSxKxH, v_BxSxKxH = ops.projection(kv_in, [key, value], dtype, cfg)
    else:
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = ops.projection(x_BxTxD, [query, key, value], dtype, cfg)
    if cfg.position == "rope" and not is_cross:
      q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
      k_BxSxKxH = rope(k_BxSxKxH, positions_BxT, cfg.rope_theta)
    if self.decode and not is_cross:
      keep_positions = cfg.position == "alibi"
      k_BxSxKxH, v_BxSxKxH, kv_positions_BxS = self._update_cache(
        k_BxSxKxH, v_BxSxKxH, positions_BxT if keep_positions else None
      )
      bias_BxNxTxS = self.score_bias(positions_BxT, kv_positions_BxS)
      mask = ops.attention.Mask(mask.dense_Bx1xTxS)  # queries sit at cache slots: segment ids no longer say it all
    if sow:
      weights_BxNxTxS = ops.attention.attention_weights(q_BxTxNxH, k_BxSxKxH, mask.dense_Bx1xTxS, bias_BxNxTxS)
      self.sow(sow, "attention_weights", weights_BxNxTxS)
      return self._output(ops.attention.attend_with_weights(weights_BxNxTxS, v_BxSxKxH))
    # While decoding, queries sit at cache slots, not at their row index: not causal by row.
    out_BxTxNxH = ops.attention.attention(
      q_BxTxNxH,
      k_BxSxKxH,
      v_BxSxKxH,
      mask,
      cfg,
      causal=self.causal and not self.decode,
      bias_BxNxTxS=bias_BxNxTxS,
    )
    return self._output(out_BxTxNxH)

  def _weights_collection(self) -> str | None:
    """Where to sow the attention weights: 'attention_weights' when the apply made it mutable (never while
    initializing, when every collection is), 'intermediates' under `model.sow_attention_weights`, else None."""
    if self.is_mutable_collection(ATTENTION_WEIGHTS) and not self.is_initializing():
      return ATTENTION_WEIGHTS
    return "intermediates" if self.cfg.get("sow_attention_weights", False) else None

  def _output(self, out_BxTxNxH: Array) -> Array:
    cfg = self.cfg
    num_heads, hd = out_BxTxNxH.shape[2:]
    kernel_NxHxD, bias_D = DenseParams(
      (num_heads, hd), (cfg.d_model,), ("heads", "head_dim", "embed"), cfg, name="out"
    )()
    (out_BxTxD,) = ops.projection(
      rearrange(out_BxTxNxH, "B T N H -> B T (N H)"),
      [(rearrange(kernel_NxHxD, "N H D -> (N H) D"), bias_D)],
      DTYPES[cfg.dtype],
      cfg,
    )
    return nn.Dropout(cfg.dropout_rate)(out_BxTxD, deterministic=self.deterministic)

  def _update_cache(
    self, k_BxTxKxH: Array, v_BxTxKxH: Array, positions_BxT: Array | None
  ) -> tuple[Array, Array, Array | None]:
    """Writes T new keys/values (and their positions, when given) at the cache index; returns the whole cache.

    The cache length is fixed when the cache is created (the `init` call with
    `decode=True` and a full-length input); later calls write T entries.
    """
    is_initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
    cached_positions = None
    if positions_BxT is not None:
      cached_positions = self.variable("cache", "cached_position", jnp.zeros, positions_BxT.shape, jnp.int32)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return k_BxTxKxH, v_BxTxKxH, positions_BxT
    start = (0, index.value, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxH.astype(cached_k.value.dtype), start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxH.astype(cached_v.value.dtype), start)
    if cached_positions is not None:
      cached_positions.value = jax.lax.dynamic_update_slice(
        cached_positions.value, positions_BxT.astype(jnp.int32), start[:2]
      )
    index.value = index.value + k_BxTxKxH.shape[1]
    return cached_k.value, cached_v.value, None if cached_positions is None else cached_positions.value


class Mlp(nn.Module):
  """The feed-forward sublayer: down(act(up x)), or down(silu(gate x) * up x) for `model.mlp='swiglu'`.

  `model.mlp` names the activation in `ops.ACTIVATIONS` (gelu, gelu_exact,
  relu, squared_relu); takes and returns B x T x D.
  """

  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.cfg
    dtype, d = DTYPES[cfg.dtype], x_BxTxD.shape[-1]
    up = DenseParams((d,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, name="up")()
    if cfg.mlp == "swiglu":
      gate = DenseParams((d,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, name="gate")()
      gate_BxTxF, up_BxTxF = ops.projection(x_BxTxD, [gate, up], dtype, cfg)
      h_BxTxF = ops.ACTIVATIONS["silu"](gate_BxTxF) * up_BxTxF
    elif ops.activation.fuses_bias(cfg.mlp, cfg, dtype):
      # The bias add goes into the activation's kernel, which also sums its gradient.
      (pre_BxTxF,) = ops.projection(x_BxTxD, [(up[0], None)], dtype, cfg)
      h_BxTxF = ops.bias_activation(pre_BxTxF, up[1], cfg.mlp, cfg)
    else:
      (pre_BxTxF,) = ops.projection(x_BxTxD, [up], dtype, cfg)
      h_BxTxF = ops.bias_activation(pre_BxTxF, None, cfg.mlp, cfg)
    h_BxTxF = nn.Dropout(cfg.dropout_rate)(h_BxTxF, deterministic=self.deterministic)
    down = DenseParams((cfg.mlp_dim,), (cfg.d_model,), ("mlp", "embed"), cfg, name="down")()
    return ops.projection(h_BxTxF, [down], dtype, cfg)[0]


class Block(nn.Module):
  """One Transformer layer: self-attention, optional cross-attention, MLP; B x T x D in and out.

  Pre-norm (GPT-2, LLaMA) normalizes each sublayer's input; post-norm
  (Vaswani et al., BERT) normalizes after each residual addition.

  Extension point: `attention_cls` and `mlp_cls` build the sublayers (they
  take the constructor arguments of `Attention` and `Mlp`). A new wiring is a
  subclass that overrides `__call__` (see `ParallelBlock`); `Stack` gives it
  scan, remat, the decode cache, dropout and the sharding constraint.
  """

  cfg: ml_collections.ConfigDict
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False
  attention_cls: Any = Attention
  mlp_cls: Any = Mlp

  def self_attention(self, name: str = "self_attention") -> nn.Module:
    """The self-attention sublayer, built from `attention_cls`."""
    return self.attention_cls(self.cfg, self.decode, self.deterministic, self.causal, name=name)

  def mlp(self, name: str = "mlp") -> nn.Module:
    """The MLP sublayer, built from `mlp_cls`."""
    return self.mlp_cls(self.cfg, self.deterministic, name=name)

  def dropout(self, x: Array) -> Array:
    """Residual dropout at `model.dropout_rate`."""
    return nn.Dropout(self.cfg.dropout_rate)(x, deterministic=self.deterministic)

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxS, positions_BxT, encoded_BxSxD=None, cross_mask_Bx1xTxS=None):
    cfg = self.cfg
    sublayers = [("self_attention", lambda h: self.self_attention()(h, mask_Bx1xTxS, positions_BxT))]
    if self.cross:
      cross_attention = self.attention_cls(cfg, False, self.deterministic, name="cross_attention")
      sublayers.append(("cross_attention", lambda h: cross_attention(h, cross_mask_Bx1xTxS, kv_BxSxD=encoded_BxSxD)))
    sublayers.append(("mlp", lambda h: self.mlp()(h)))
    for name, sublayer in sublayers:
      norm = Norm(cfg, name=f"{name}_norm")
      if cfg.norm_position == "pre":
        x_BxTxD = x_BxTxD + self.dropout(sublayer(norm(x_BxTxD)))
      else:
        x_BxTxD = norm(x_BxTxD + self.dropout(sublayer(x_BxTxD)))
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class ParallelBlock(Block):
  """GPT-J / PaLM's parallel residual: x + attention(norm(x)) + mlp(norm(x)), one norm for both.

  `model.parallel_residual=True` selects it (pre-norm, no cross-attention).
  """

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxS, positions_BxT, encoded_BxSxD=None, cross_mask_Bx1xTxS=None):
    if self.cross or self.cfg.norm_position != "pre":
      raise ValueError(
        "model.parallel_residual needs model.norm_position='pre' and no cross-attention "
        "(model.family decoder or encoder)"
      )
    h_BxTxD = Norm(self.cfg, name="norm")(x_BxTxD)
    attention_BxTxD = self.self_attention()(h_BxTxD, mask_Bx1xTxS, positions_BxT)
    x_BxTxD = x_BxTxD + self.dropout(attention_BxTxD) + self.dropout(self.mlp()(h_BxTxD))
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


def block_class(cfg: ml_collections.ConfigDict) -> type[Block]:
  """The block the model config asks for: `ParallelBlock` with `model.parallel_residual`, else `Block`."""
  return ParallelBlock if cfg.get("parallel_residual", False) else Block


def is_moe_layer(cfg: ml_collections.ConfigDict, index: int) -> bool:
  """Whether layer `index` (from 0) of a stack is a mixture-of-experts layer: every `moe_every`-th layer
  (n-1, 2n-1, ...) when `moe_experts` > 0 (docs/moe.md)."""
  return cfg.get("moe_experts", 0) > 0 and (index + 1) % cfg.get("moe_every", 1) == 0


_REMAT_POLICIES: dict[str, Any] = {
  "full": None,  # save nothing: recompute the whole layer in the backward pass
  "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots, jax.checkpoint_policies.save_only_these_names(ops.dense.CPU_DENSE)
  ),
  "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    jax.checkpoint_policies.save_only_these_names(ops.dense.CPU_DENSE),
  ),
}


class Stack(nn.Module):
  """`num_layers` blocks, either unrolled or as one `nn.scan` (compile time flat in depth).

  `causal=True` declares that the mask hides later positions (decoders).
  `block_cls` (default `block_class(cfg)`), `attention_cls` and `mlp_cls`
  choose the classes; the MoE layers of `model.moe_experts` (`is_moe_layer`)
  take `moe_mlp_cls` in place of `mlp_cls` (the families pass
  `jaxlm.models.moe.MoeMlp`, which builds on this module); any `Block` subclass keeps scan, remat, the cache and
  dropout. Returns x_BxTxD, or with `return_hidden_states=True` (x_BxTxD,
  hidden_LxBxTxD): every block's output, stacked.
  """

  cfg: ml_collections.ConfigDict
  num_layers: int
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False
  block_cls: Any = None
  attention_cls: Any = Attention
  mlp_cls: Any = Mlp
  moe_mlp_cls: Any = None

  @nn.compact
  def __call__(
    self,
    x_BxTxD,
    mask_Bx1xTxS,
    positions_BxT,
    encoded_BxSxD=None,
    cross_mask_Bx1xTxS=None,
    *,
    return_hidden_states: bool = False,
  ):
    cfg = self.cfg
    block = self.block_cls or block_class(cfg)
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.get("moe_experts", 0) and self.moe_mlp_cls is None:
      raise ValueError("model.moe_experts needs Stack(moe_mlp_cls=...), e.g. jaxlm.models.moe.MoeMlp")

    def fields(index: int) -> tuple:
      mlp_cls = self.moe_mlp_cls if is_moe_layer(cfg, index) else self.mlp_cls
      return (cfg, self.cross, self.decode, self.deterministic, self.causal, self.attention_cls, mlp_cls)

    args = (mask_Bx1xTxS, positions_BxT, encoded_BxSxD, cross_mask_Bx1xTxS)
    if cfg.scan_layers:  # one body for every layer: moe_every must be 1 (config validation says so)
      scanned = nn.scan(
        _ScanAdapter,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0, ATTENTION_WEIGHTS: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 4,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BxTxD, hidden_LxBxTxD = scanned(block, *fields(0), return_hidden_states, name="layers")(x_BxTxD, *args)
    else:
      hidden = []
      for i in range(self.num_layers):
        x_BxTxD = block(*fields(i), name=f"layer_{i}")(x_BxTxD, *args)
        hidden.append(x_BxTxD)
      hidden_LxBxTxD = jnp.stack(hidden) if return_hidden_states else None
    return (x_BxTxD, hidden_LxBxTxD) if return_hidden_states else x_BxTxD


class _ScanAdapter(nn.Module):
  """Gives a block the (carry, out) signature that `nn.scan` needs; out is the block's output when asked."""

  block: Any
  cfg: ml_collections.ConfigDict
  cross: bool
  decode: bool
  deterministic: bool
  causal: bool
  attention_cls: Any
  mlp_cls: Any
  output: bool

  @nn.compact
  def __call__(self, x_BxTxD, *args):
    x_BxTxD = self.block(
      self.cfg, self.cross, self.decode, self.deterministic, self.causal, self.attention_cls, self.mlp_cls, name="block"
    )(x_BxTxD, *args)
    return x_BxTxD, (x_BxTxD if self.output else None)


class _Embed(nn.Embed):
  """nn.Embed whose table is gathered along `embed` before the lookup.

  The table is split over `vocab` and `embed` (tensor and fsdp by the default rules). Looking rows up in a table
  split along `embed` gives rows split along `embed`, which the SPMD partitioner cannot turn into the batch-split
  activations the model needs without replicating them ("Involuntary full rematerialization", in the lookup and
  in its transpose). Gathered along `embed` first, as FSDP gathers every weight before use, the lookup splits
  like its token ids and the vocabulary split costs one all-reduce. The values are the same.
  """

  vocab_axis: str | None = None  # the table's first logical axis: 'vocab' for tokens, None for positions and types

  def __call__(self, inputs: Array) -> Array:
    (table_VxD,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
    if self.num_embeddings == 1:
      return jnp.broadcast_to(table_VxD, inputs.shape + (self.features,))
    table_VxD = nn.with_logical_constraint(table_VxD, (self.vocab_axis, None))
    return jnp.take(table_VxD, inputs, axis=0)


class Embedder(nn.Module):
  """Token (+ token-type) embeddings, positions, and the output projection."""

  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    init = nn.with_logical_partitioning(_kernel_init, ("vocab", "embed"))
    self.token = _Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=init,
      dtype=DTYPES[cfg.dtype],
      param_dtype=DTYPES[cfg.param_dtype],
      vocab_axis="vocab",
    )
    if cfg.position == "learned":
      self.position = _Embed(
        cfg.max_len,
        cfg.d_model,
        embedding_init=nn.with_logical_partitioning(_kernel_init, (None, "embed")),
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
      )
    if cfg.num_token_types:
      self.token_type = _Embed(
        cfg.num_token_types,
        cfg.d_model,
        embedding_init=nn.with_logical_partitioning(_kernel_init, (None, "embed")),
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
      )
    if not cfg.tie_embeddings:
      self.unembed = dense(cfg.vocab_size, ("embed", "vocab"), cfg, "unembed", use_bias=False)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.get("embed_norm", False):
      self.embed_norm = Norm(cfg)  # BERT normalizes the summed embeddings

  def embed(
    self,
    tokens_BxT: Array | None,
    positions_BxT: Array,
    token_types_BxT: Array | None = None,
    inputs_embeds_BxTxD: Array | None = None,
  ) -> Array:
    """The embedded input B x T x D: token lookup (or `inputs_embeds_BxTxD` in its place), scaling,
    positions, token types, embedding norm and dropout."""
    cfg = self.cfg
    x_BxTxD = self.token(tokens_BxT) if inputs_embeds_BxTxD is None else inputs_embeds_BxTxD
    if cfg.scale_embeddings:
      x_BxTxD = x_BxTxD * jnp.sqrt(jnp.asarray(cfg.d_model, x_BxTxD.dtype))
    if cfg.position == "learned":
      x_BxTxD = x_BxTxD + self.position(positions_BxT)
    elif cfg.position == "sinusoidal":
      x_BxTxD = x_BxTxD + sinusoidal(positions_BxT, cfg.d_model).astype(x_BxTxD.dtype)
    if cfg.num_token_types and token_types_BxT is not None:
      x_BxTxD = x_BxTxD + self.token_type(token_types_BxT)
    if self.cfg.get("embed_norm", False):
      x_BxTxD = self.embed_norm(x_BxTxD)
    x_BxTxD = self.dropout(x_BxTxD, deterministic=self.deterministic)
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))

  def logits(self, x_BxTxD: Array) -> Array:
    if self.cfg.tie_embeddings:
      return self.token.attend(x_BxTxD)
    return self.unembed(x_BxTxD)
