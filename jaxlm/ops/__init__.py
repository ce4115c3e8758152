"""Ops: attention, norm, dense and activation, each with implementations chosen in one place.

Layers call these functions only; `dispatch.choose` decides which
implementation runs, from the target devices (the mesh set with
`jax.set_mesh`), the dtype and the model config. See `jaxlm/ops/dispatch.py`
for the rule and `jaxlm/ops/attention.py` for the attention extension point
(`register_attention`).

  attention.py      the attention op, its registry entries (xla, cpu, cudnn), weights for introspection
  xla_attention.py  the XLA implementation: block-causal core with its own backward (the reference)
  norm.py           LayerNorm / RMSNorm
  dense.py          fused projections (several kernels, one matmul)
  activation.py     bias + activation, and the table of activations
  pallas_attention.py  splash (TPU) and triton (GPU) Pallas attention, registered through `register_attention`
  moe.py            mixture-of-experts dispatch (dropless, capacity, dense) and expert parallelism
"""

from jaxlm.ops import (
  activation,
  attention,
  dense,
  dispatch,
  moe,
  norm,
  pallas_attention,  # noqa: F401  registers attention_impl splash (TPU) and triton (GPU)
)
from jaxlm.ops.activation import ACTIVATIONS, bias_activation
from jaxlm.ops.attention import register_attention
from jaxlm.ops.dense import projection
from jaxlm.ops.dispatch import REGISTRY, Implementation, Target, choose, current_target

__all__ = [
  "ACTIVATIONS",
  "REGISTRY",
  "Implementation",
  "Target",
  "activation",
  "attention",
  "bias_activation",
  "choose",
  "current_target",
  "dense",
  "dispatch",
  "moe",
  "norm",
  "projection",
  "register_attention",
]
