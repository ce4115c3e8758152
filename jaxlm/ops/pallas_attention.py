"""Pallas attention kernels behind `model.attention_impl`: TPU splash attention and the GPU (Triton) flash kernel.

splash (`attention_impl=splash`): `jax.experimental.pallas.ops.tpu.
  splash_attention`, the block-sparse flash kernel MaxText uses on TPU.
  Causal masking and packed documents are built blockwise from the segment
  ids (no T x S mask in memory), grouped-query attention reads each key/value
  head for its N // K query heads, and `model.attention_block_size` sets the
  query and key tiles (a multiple of 128 dividing the lengths; 0: 512).
triton (`attention_impl=triton`): `jax.experimental.pallas.ops.gpu.
  attention.mha`, a Pallas flash kernel lowered through Triton, with one
  segment-id array (self-attention: decoders' causal attention; other calls
  run on XLA) and causal masking. It has no GQA, so
  key/value heads are repeated to the query heads first. Its tiles are
  `model.attention_block_size` too (0: 128).

Both are Pallas calls, which XLA cannot partition: on a mesh they run under
`jax.shard_map`, batch split over the data axes and heads over `tensor`, as
the logical rules place them. On a CPU target they run in Pallas interpret
mode: the same kernel code, executed op by op; that is how CI checks their
values and gradients against the XLA path (tests/unit/test_pallas_attention.py).
Interpret mode is slow: a check, not a way to train.

Masks: the kernels see only segment ids, so padding (segment 0) queries may
attend to padding keys where the XLA path masks them; the losses give those
rows weight 0 (the contract in `jaxlm.ops.attention`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from jax.sharding import PartitionSpec

from jaxlm.errors import ConfigError
from jaxlm.ops import dispatch
from jaxlm.ops.attention import register_attention

Array = jax.Array

_LANES = 128  # TPU vector lanes: splash tiles are multiples of this


def _check_block(block: int, t: int, s: int) -> int:
  """The tile size splash uses for lengths t and s: `block`, or the length when shorter."""
  tile = min(block, t, s)
  if tile % _LANES or t % tile or s % tile:
    raise ConfigError(
      f"model.attention_block_size={block} gives tiles of {tile} for sequence lengths {t} and {s}; splash needs a "
      f"multiple of {_LANES} dividing both: set data.seq_len to a multiple of {_LANES} or change the block size"
    )
  return tile


def splash_attention(
  q_BxTxNxH: Array,
  k_BxSxKxH: Array,
  v_BxSxKxH: Array,
  q_segment_ids_BxT: Array,
  kv_segment_ids_BxS: Array,
  *,
  causal: bool,
  block_size: int = 512,
  interpret: bool = False,
) -> Array:
  """Splash attention on one device's shard: out_BxTxNxH in v's dtype.

  Segment ids (int32) hide other documents; `causal` hides later keys
  (T == S). K divides N. q is scaled by 1/sqrt(H) here, as the kernel does not.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # local: importing jaxlm loads no Pallas

  b, t, n, h = q_BxTxNxH.shape
  s = k_BxSxKxH.shape[1]
  tile = _check_block(block_size, t, s)
  sizes = splash.BlockSizes(
    block_q=tile,
    block_kv=tile,
    block_kv_compute=tile,
    block_q_dkv=tile,
    block_kv_dkv=tile,
    block_kv_dkv_compute=tile,
    block_q_dq=tile,
    block_kv_dq=tile,
  )
  head_mask = splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
  kernel = splash.make_splash_mha(
    splash.MultiHeadMask([head_mask] * n), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  q_BxNxTxH = rearrange(q_BxTxNxH * jnp.asarray(h**-0.5, q_BxTxNxH.dtype), "b t n h -> b n t h")
  k_BxKxSxH = rearrange(k_BxSxKxH, "b s k h -> b k s h")
  v_BxKxSxH = rearrange(v_BxSxKxH, "b s k h -> b k s h")
  segments = splash.SegmentIds(q=q_segment_ids_BxT.astype(jnp.int32), kv=kv_segment_ids_BxS.astype(jnp.int32))
  out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segments)
  return rearrange(out_BxNxTxH, "b n t h -> b t n h").astype(v_BxSxKxH.dtype)


def triton_attention(
  q_BxTxNxH: Array,
  k_BxTxKxH: Array,
  v_BxTxKxH: Array,
  segment_ids_BxT: Array,
  *,
  causal: bool,
  block_size: int = 128,
  interpret: bool = False,
) -> Array:
  """The Pallas GPU flash kernel on one device's shard, self-attention (T == S): out_BxTxNxH.

  Key/value heads are repeated to N (the kernel has no GQA). `block_size`
  tiles queries and keys (capped at T, which it must divide).
  """
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # local, as in splash_attention

  b, t, n, h = q_BxTxNxH.shape
  group = n // k_BxTxKxH.shape[2]
  k_BxTxNxH = repeat(k_BxTxKxH, "b t k h -> b t (k g) h", g=group)
  v_BxTxNxH = repeat(v_BxTxKxH, "b t k h -> b t (k g) h", g=group)
  tile = min(block_size, t)
  if t % tile:
    raise ConfigError(
      f"model.attention_block_size={block_size} does not divide the sequence length {t}; "
      "choose a block size dividing data.seq_len"
    )
  sizes = gpu_attention.BlockSizes(
    block_q=tile, block_k=tile, block_q_dkv=tile, block_kv_dkv=tile, block_q_dq=tile, block_kv_dq=tile
  )
  return gpu_attention.mha(
    q_BxTxNxH,
    k_BxTxNxH,
    v_BxTxNxH,
    segment_ids_BxT.astype(jnp.int32),
    sm_scale=h**-0.5,
    causal=causal,
    block_sizes=sizes,
    interpret=interpret,
  ).astype(v_BxTxKxH.dtype)


def _on_mesh(kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS):
  """Runs `kernel(q, k, v, q_segments, kv_segments)` per shard under the mesh of the trace, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS)
  if mesh.empty or mesh.size == 1:
    return kernel(*args)
  names = (
    ("batch", "length", "heads", "head_dim"),
    ("batch", "length", "kv_heads", "head_dim"),
    ("batch", "length", "kv_heads", "head_dim"),
    ("batch", "length"),
    ("batch", "length"),
  )
  specs = tuple(_fitting(nn.logical_to_mesh_axes(axes), x.shape, mesh) for axes, x in zip(names, args))
  # check_vma=False: Pallas calls do not declare how their outputs vary over the mesh axes.
  return jax.shard_map(kernel, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def _fitting(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
  """`spec` without the mesh axes that do not divide their dimension (the 1-row batch of initialization)."""

  def fits(axes, size):
    return axes is None or size % math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)) == 0

  return PartitionSpec(*(axes if fits(axes, size) else None for axes, size in zip(spec, shape)))


def _interpret() -> bool:
  """Interpret mode unless the trace targets the kernel's own accelerator."""
  return dispatch.current_target().platform == "cpu"


def _splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  del mask_Bx1xTxS  # rebuilt blockwise from the segment ids
  kernel = functools.partial(
    splash_attention, causal=causal, block_size=model_cfg.get("attention_block_size", 0) or 512, interpret=_interpret()
  )
  return _on_mesh(kernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_ids_BxT, kv_segment_ids_BxS)


def _triton(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg):
  # The kernel takes one segment array for queries and keys, so it serves self-attention only: causal
  # attention is (T == S, same ids), and so is a call given one array twice. Anything else, including
  # cross-attention at equal lengths and encoder self-attention whose ids a scan has split into two
  # tracers, runs on XLA.
  if not (causal or q_segment_ids_BxT is kv_segment_ids_BxS):
    return dispatch.REGISTRY["attention"]["xla"].fn(
      q_BxTxNxH,
      k_BxSxKxH,
      v_BxSxKxH,
      mask_Bx1xTxS=mask_Bx1xTxS,
      q_segment_ids_BxT=q_segment_ids_BxT,
      kv_segment_ids_BxS=kv_segment_ids_BxS,
      causal=causal,
      model_cfg=model_cfg,
    )
  kernel = functools.partial(
    triton_attention, causal=causal, block_size=model_cfg.get("attention_block_size", 0) or 128, interpret=_interpret()
  )
  return _on_mesh(
    lambda q, k, v, q_segments, kv_segments: kernel(q, k, v, q_segments),
    q_BxTxNxH,
    k_BxSxKxH,
    v_BxSxKxH,
    q_segment_ids_BxT,
    kv_segment_ids_BxS,
  )


# "cpu" runs the kernels in interpret mode, for tests; "cuda" is how jax names an NVIDIA GPU target.
register_attention("splash", _splash, platforms=("tpu", "cpu"), needs_segment_ids=True)
register_attention("triton", _triton, platforms=("gpu", "cuda", "cpu"), needs_segment_ids=True)
