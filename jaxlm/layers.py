"""The Transformer layers that every family is built from.

Shape letters, used in tensor names throughout jaxlm:
  B batch, T query length, S key/value length, D d_model, N query heads,
  K key/value heads, H head dimension, F MLP hidden size, V vocabulary.

Every parameter carries logical axis names; `jaxlm.sharding` maps them onto
the mesh through the rules table in the config.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from jaxlm import config as config_lib
from jaxlm import cpu_kernels
from jaxlm.attention import dot_product_attention

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_kernel_init = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


def dense(features, axes: tuple[str, ...], cfg, name: str, in_axis: int | tuple = -1,
          use_bias: bool | None = None) -> nn.DenseGeneral:
  """DenseGeneral whose kernel and bias carry the logical names `axes` (inputs first)."""
  features = features if isinstance(features, tuple) else (features,)
  use_bias = cfg.use_bias if use_bias is None else use_bias
  return nn.DenseGeneral(
      features, axis=in_axis, use_bias=use_bias, name=name,
      dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
      kernel_init=nn.with_logical_partitioning(_kernel_init, axes),
      bias_init=nn.with_logical_partitioning(_zeros, axes[-len(features):]))


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
    kernel = self.param("kernel", nn.with_logical_partitioning(
        lambda rng, _, dt: _kernel_init(rng, flat, dt).reshape(shape), self.axes), shape, dtype)
    bias = None
    if self.cfg.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(_zeros, self.axes[-len(self.features):]),
                        self.features, dtype)
    return kernel, bias


_SEPARATE_BELOW_ROWS = 64
# The CPU dense kernel's outputs are matmul outputs too, but custom calls, not dots, so they carry
# this name for the `dots` remat policies (_REMAT_POLICIES).
_CPU_DENSE = "cpu_dense"


def _kernels_on(cfg) -> bool:
  """`model.cpu_kernels`; runs saved before the option existed have it on."""
  return cfg.get("cpu_kernels", True)


def fused_projection(x_BxTxI: Array, projections: list[tuple[Array, Array | None]], dtype,
                     split: bool = True, cpu_kernel: bool = False) -> list[Array] | Array:
  """x @ [W1 | W2 | ...] + [b1 | b2 | ...] as one 2-D matmul, split back into one output per kernel.

  Kernels are (I, *features) with the same input size; outputs are (B, T, *features).
  One wide matmul (and one of each in the backward pass) runs well above three
  narrow ones on CPU; see BENCHMARKS.md. `split=False` returns the (B, T, C)
  product unsplit, for a consumer that reads the parts in place. `cpu_kernel`
  lets float32 on CPU run through MKL or OpenBLAS (`cpu_kernels.dense`).
  """
  b, t, i = x_BxTxI.shape
  if split and b * t <= _SEPARATE_BELOW_ROWS:
    # Decoding: with a few rows the matmuls are bound by reading the weights, and the
    # concatenation would copy every kernel once more per token.
    x_MxI = x_BxTxI.reshape(b * t, i).astype(dtype)
    outputs = []
    for kernel, bias in projections:
      y_MxC = x_MxI @ kernel.reshape(i, -1).astype(dtype)
      if bias is not None:
        y_MxC = y_MxC + bias.reshape(-1).astype(dtype)
      outputs.append(y_MxC.reshape(b, t, *kernel.shape[1:]))
    return outputs
  widths = [math.prod(k.shape[1:]) for k, _ in projections]
  kernel_IxC = jnp.concatenate([k.reshape(i, -1) for k, _ in projections], axis=1).astype(dtype)
  x_MxI = x_BxTxI.reshape(b * t, i).astype(dtype)
  has_bias = all(bias is not None for _, bias in projections)
  bias_C = jnp.concatenate([bias.reshape(-1) for _, bias in projections]).astype(dtype) if has_bias else None
  if cpu_kernel and cpu_kernels.usable(x_MxI, kernel_IxC) and cpu_kernels.blas():
    y_MxC = cpu_kernels.dense(x_MxI, kernel_IxC, jnp.zeros(sum(widths), dtype) if bias_C is None else bias_C)
    y_MxC = checkpoint_name(y_MxC, _CPU_DENSE)
  else:
    y_MxC = x_MxI @ kernel_IxC
    if has_bias:
      y_MxC = y_MxC + bias_C
  if not split:
    return y_MxC.reshape(b, t, -1)
  splits = jnp.split(y_MxC, list(itertools.accumulate(widths))[:-1], axis=1)
  return [y.reshape(b, t, *k.shape[1:]) for y, (k, _) in zip(splits, projections)]


class Norm(nn.Module):
  """LayerNorm or RMSNorm whose statistics are computed in float32."""
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.cfg
    x = x_BxTxD.astype(jnp.float32)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), DTYPES[cfg.param_dtype])
    bias = None
    if cfg.norm != "rmsnorm" and cfg.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(_zeros, ("norm",)),
                        (x.shape[-1],), DTYPES[cfg.param_dtype])
    if _kernels_on(cfg) and cpu_kernels.usable(x, scale):
      y = cpu_kernels.norm(x.reshape(-1, x.shape[-1]), scale, jnp.zeros_like(scale) if bias is None else bias,
                           cfg.norm == "rmsnorm", cfg.norm_eps).reshape(x.shape)
    elif cfg.norm == "rmsnorm":
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
      y = x * scale.astype(jnp.float32)
    else:
      mean = jnp.mean(x, axis=-1, keepdims=True)
      x = x - mean
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
      y = x * scale.astype(jnp.float32)
      if bias is not None:
        y = y + bias.astype(jnp.float32)
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


def attention_mask(q_segment_BxT: Array, kv_segment_BxS: Array, causal: bool,
                   q_index_BxT: Array | None = None, kv_index_BxS: Array | None = None) -> Array:
  """Boolean B x 1 x T x S mask: same segment, neither side padding (segment 0), and causal.

  Causality is by index within the row (or the cache slot while decoding), so
  packed documents, whose segments never match, cannot see each other.
  """
  mask = (q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :])
  mask &= (q_segment_BxT[:, :, None] != 0) & (kv_segment_BxS[:, None, :] != 0)
  if causal:
    if q_index_BxT is None:
      q_index_BxT = jnp.arange(q_segment_BxT.shape[1])[None]
    if kv_index_BxS is None:
      kv_index_BxS = jnp.arange(kv_segment_BxS.shape[1])[None]
    mask &= q_index_BxT[:, :, None] >= kv_index_BxS[:, None, :]
  return mask[:, None]


class Attention(nn.Module):
  """Multi-head, grouped-query or multi-query attention; self or cross.

  `kv_BxSxD` switches to cross-attention. With `decode=True` keys and values
  are appended to a static-shape cache in the 'cache' collection, so one
  compiled decode step serves every position. `causal=True` declares that the
  mask hides later keys (see `dot_product_attention`).
  """
  cfg: ml_collections.ConfigDict
  decode: bool = False
  deterministic: bool = True
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: Array, mask_Bx1xTxS: Array, positions_BxT: Array | None = None,
               kv_BxSxD: Array | None = None) -> Array:
    cfg = self.cfg
    num_heads, num_kv, hd = cfg.num_heads, config_lib.num_kv_heads(cfg), config_lib.head_dim(cfg)
    is_cross = kv_BxSxD is not None
    kv_in = kv_BxSxD if is_cross else x_BxTxD
    dtype, d = DTYPES[cfg.dtype], x_BxTxD.shape[-1]
    query = DenseParams((d,), (num_heads, hd), ("embed", "heads", "head_dim"), cfg, name="query")()
    key = DenseParams((kv_in.shape[-1],), (num_kv, hd), ("embed", "kv_heads", "head_dim"), cfg, name="key")()
    value = DenseParams((kv_in.shape[-1],), (num_kv, hd), ("embed", "kv_heads", "head_dim"), cfg, name="value")()
    b, t = x_BxTxD.shape[:2]
    kernels = _kernels_on(cfg)
    if (not is_cross and not self.decode and cfg.position != "rope" and cfg.attention_impl == "xla"
        and kernels and cpu_kernels.usable(x_BxTxD)):
      # The CPU kernel reads q, k and v in place from the fused projection (cpu_kernels.self_attention).
      qkv_BxTxC = fused_projection(x_BxTxD, [query, key, value], dtype, split=False, cpu_kernel=kernels)
      mask_BxTxT = jnp.broadcast_to(mask_Bx1xTxS, (b, 1, t, t))[:, 0].astype(bool)
      out_BxTxNxH = cpu_kernels.self_attention(qkv_BxTxC.reshape(b, t, num_heads + 2 * num_kv, hd), mask_BxTxT,
                                               self.causal, num_heads)
      return self._output(out_BxTxNxH)
    if is_cross:
      (q_BxTxNxH,) = fused_projection(x_BxTxD, [query], dtype, cpu_kernel=kernels)
      k_BxSxKxH, v_BxSxKxH = fused_projection(kv_in, [key, value], dtype, cpu_kernel=kernels)
    else:
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH = fused_projection(x_BxTxD, [query, key, value], dtype, cpu_kernel=kernels)
    if cfg.position == "rope" and not is_cross:
      q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
      k_BxSxKxH = rope(k_BxSxKxH, positions_BxT, cfg.rope_theta)
    if self.decode and not is_cross:
      k_BxSxKxH, v_BxSxKxH = self._update_cache(k_BxSxKxH, v_BxSxKxH)
    if cfg.attention_impl == "xla":
      # While decoding, queries sit at cache slots, not at their row index: no block shortcut.
      out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS,
                                          causal=self.causal and not self.decode,
                                          cpu_kernel=kernels)
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, implementation=cfg.attention_impl)
    return self._output(out_BxTxNxH)

  def _output(self, out_BxTxNxH: Array) -> Array:
    cfg = self.cfg
    (b, t, num_heads, hd), dtype = out_BxTxNxH.shape, DTYPES[cfg.dtype]
    out = DenseParams((num_heads, hd), (cfg.d_model,), ("heads", "head_dim", "embed"), cfg, name="out")()
    (out_BxTxD,) = fused_projection(out_BxTxNxH.reshape(b, t, num_heads * hd),
                                    [(out[0].reshape(-1, cfg.d_model), out[1])], dtype, cpu_kernel=_kernels_on(cfg))
    return nn.Dropout(cfg.dropout_rate)(out_BxTxD, deterministic=self.deterministic)

  def _update_cache(self, k_BxTxKxH: Array, v_BxTxKxH: Array) -> tuple[Array, Array]:
    """Writes T new keys/values at the cache index and returns the whole cache.

    The cache length is fixed when the cache is created (the `init` call with
    `decode=True` and a full-length input); later calls write T entries.
    """
    is_initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return k_BxTxKxH, v_BxTxKxH
    start = (0, index.value, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxH.astype(cached_k.value.dtype), start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxH.astype(cached_v.value.dtype), start)
    index.value = index.value + k_BxTxKxH.shape[1]
    return cached_k.value, cached_v.value


class Mlp(nn.Module):
  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.cfg
    dtype, d, kernels = DTYPES[cfg.dtype], x_BxTxD.shape[-1], _kernels_on(cfg)
    up = DenseParams((d,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, name="up")()
    if cfg.mlp == "swiglu":
      gate = DenseParams((d,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, name="gate")()
      gate_BxTxF, up_BxTxF = fused_projection(x_BxTxD, [gate, up], dtype, cpu_kernel=kernels)
      h_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
    elif cfg.mlp == "gelu" and kernels and cpu_kernels.usable(x_BxTxD, up[0]):
      # The bias add goes into the kernel, which also sums its gradient.
      (pre_BxTxF,) = fused_projection(x_BxTxD, [(up[0], None)], dtype, cpu_kernel=kernels)
      bias_F = jnp.zeros(cfg.mlp_dim, jnp.float32) if up[1] is None else up[1]
      h_BxTxF = cpu_kernels.bias_gelu(pre_BxTxF.reshape(-1, cfg.mlp_dim), bias_F).reshape(pre_BxTxF.shape)
    else:
      (h_BxTxF,) = fused_projection(x_BxTxD, [up], dtype, cpu_kernel=kernels)
      # GPT-2 uses the tanh approximation ("gelu_new"); BERT uses the exact erf form.
      if cfg.mlp == "relu":
        h_BxTxF = nn.relu(h_BxTxF)
      else:
        h_BxTxF = nn.gelu(h_BxTxF, approximate=cfg.mlp == "gelu")
    h_BxTxF = nn.Dropout(cfg.dropout_rate)(h_BxTxF, deterministic=self.deterministic)
    down = DenseParams((cfg.mlp_dim,), (cfg.d_model,), ("mlp", "embed"), cfg, name="down")()
    return fused_projection(h_BxTxF, [down], dtype, cpu_kernel=kernels)[0]


class Block(nn.Module):
  """One Transformer layer: self-attention, optional cross-attention, MLP.

  Pre-norm (GPT-2, LLaMA) normalizes each sublayer's input; post-norm
  (Vaswani et al., BERT) normalizes after each residual addition.
  """
  cfg: ml_collections.ConfigDict
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxS, positions_BxT, encoded_BxSxD=None, cross_mask_Bx1xTxS=None):
    cfg = self.cfg
    dropout = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=self.deterministic)
    sublayers = [("self_attention", lambda h: Attention(cfg, self.decode, self.deterministic, self.causal,
                                                      name="self_attention")(
        h, mask_Bx1xTxS, positions_BxT))]
    if self.cross:
      sublayers.append(("cross_attention", lambda h: Attention(cfg, False, self.deterministic, name="cross_attention")(
          h, cross_mask_Bx1xTxS, kv_BxSxD=encoded_BxSxD)))
    sublayers.append(("mlp", lambda h: Mlp(cfg, self.deterministic, name="mlp")(h)))
    for name, sublayer in sublayers:
      norm = Norm(cfg, name=f"{name}_norm")
      if cfg.norm_position == "pre":
        x_BxTxD = x_BxTxD + dropout(sublayer(norm(x_BxTxD)))
      else:
        x_BxTxD = norm(x_BxTxD + dropout(sublayer(x_BxTxD)))
    return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


_REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, jax.checkpoint_policies.save_only_these_names(_CPU_DENSE)),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(_CPU_DENSE)),
}


class Stack(nn.Module):
  """`num_layers` Blocks, either unrolled or as one `nn.scan` (compile time flat in depth).

  `causal=True` declares that `mask_Bx1xTxS` hides later positions (decoders).
  """
  cfg: ml_collections.ConfigDict
  num_layers: int
  cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxTxD, mask_Bx1xTxS, positions_BxT, encoded_BxSxD=None, cross_mask_Bx1xTxS=None):
    cfg = self.cfg
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    args = (mask_Bx1xTxS, positions_BxT, encoded_BxSxD, cross_mask_Bx1xTxS)
    if cfg.scan_layers:
      scanned = nn.scan(
          _ScanAdapter, variable_axes={"params": 0, "cache": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * 4, length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = scanned(block, cfg, self.cross, self.decode, self.deterministic, self.causal,
                             name="layers")(x_BxTxD, *args)
      return x_BxTxD
    for i in range(self.num_layers):
      x_BxTxD = block(cfg, self.cross, self.decode, self.deterministic, self.causal,
                       name=f"layer_{i}")(x_BxTxD, *args)
    return x_BxTxD


class _ScanAdapter(nn.Module):
  """Gives a Block the (carry, out) signature that `nn.scan` needs."""
  block: Any
  cfg: ml_collections.ConfigDict
  cross: bool
  decode: bool
  deterministic: bool
  causal: bool

  @nn.compact
  def __call__(self, x_BxTxD, *args):
    return self.block(self.cfg, self.cross, self.decode, self.deterministic, self.causal, name="block")(x_BxTxD, *args), None


class Embedder(nn.Module):
  """Token (+ token-type) embeddings, positions, and the output projection."""
  cfg: ml_collections.ConfigDict
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    init = nn.with_logical_partitioning(_kernel_init, ("vocab", "embed"))
    self.token = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init,
                          dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
    if cfg.position == "learned":
      self.position = nn.Embed(cfg.max_len, cfg.d_model,
                               embedding_init=nn.with_logical_partitioning(_kernel_init, (None, "embed")),
                               dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
    if cfg.num_token_types:
      self.token_type = nn.Embed(cfg.num_token_types, cfg.d_model,
                                 embedding_init=nn.with_logical_partitioning(_kernel_init, (None, "embed")),
                                 dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype])
    if not cfg.tie_embeddings:
      self.unembed = dense(cfg.vocab_size, ("embed", "vocab"), cfg, "unembed", use_bias=False)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.get("embed_norm", False):
      self.embed_norm = Norm(cfg)  # BERT normalizes the summed embeddings

  def embed(self, tokens_BxT: Array, positions_BxT: Array, token_types_BxT: Array | None = None) -> Array:
    cfg = self.cfg
    x_BxTxD = self.token(tokens_BxT)
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
