"""Kernel choice in one place: `choose` picks each op's implementation.

Every op (attention, norm, dense, activation) keeps a table of named
`Implementation`s in `REGISTRY`. `choose` reads three things and nothing else:

- the target devices: the platform and size of the mesh set with
  `jax.set_mesh` (jaxlm's train, eval and decode steps trace under it), or the
  default backend on one device when no mesh is set. Never the process's
  default backend alone, so a CPU host compiling ahead of time for a TPU mesh
  gets TPU code, not the CPU kernels' custom calls;
- the dtype the op computes in;
- the model config (`model.attention_impl`, `model.cpu_kernels`).

The rule: an implementation the config names (`model.attention_impl`) is used
where its platforms include the target's, else `choose` raises naming the key.
Otherwise the first automatic implementation whose conditions hold (the CPU
kernels: CPU target, one device, float32, built, `model.cpu_kernels`), else
"xla". Custom calls are not partitioned by XLA, so on a mesh of more than one
device the CPU kernels stand aside and activations keep the shardings an
accelerator gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jaxlm.errors import ConfigError

OPS = ("attention", "norm", "dense", "activation")


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a computation is traced for: platform ('cpu', 'gpu', 'tpu') and how many."""

  platform: str
  num_devices: int


def current_target() -> Target:
  """The target of the trace in progress: the mesh set by `jax.set_mesh`, else the default backend, one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return Target(mesh.abstract_device.platform, mesh.size)
  return Target(jax.default_backend(), 1)


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One implementation of an op.

  fn: the function; its signature is the op's (see the op's module).
  platforms: target platforms it runs on; None runs anywhere.
  dtypes: dtypes it computes in; None takes any.
  single_device: a custom call XLA cannot partition; stands aside on a mesh of more than one device.
  automatic: chosen without being named when its conditions hold (and `model.cpu_kernels`, the
    switch of the one automatic family so far); False: only when the config names it.
  available: a check that it can run here at all (a kernel library built), called last.
  variants: the variants it handles (activation names); None handles all.
  extras: per-implementation capabilities the op's module documents (attention: 'packed').
  """

  fn: Callable
  platforms: tuple[str, ...] | None = None
  dtypes: tuple[Any, ...] | None = None
  single_device: bool = False
  automatic: bool = False
  available: Callable[[], bool] = lambda: True
  variants: tuple[str, ...] | None = None
  extras: dict = dataclasses.field(default_factory=dict)


REGISTRY: dict[str, dict[str, Implementation]] = {op: {} for op in OPS}


def register(op: str, name: str, implementation: Implementation) -> Implementation:
  """Adds (or replaces) `name` in the op's table; returns the implementation."""
  if op not in REGISTRY:
    raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
  REGISTRY[op][name] = implementation
  return implementation


def _runs(implementation: Implementation, target: Target, dtype, variant: str | None) -> bool:
  return (
    (implementation.platforms is None or target.platform in implementation.platforms)
    and (implementation.dtypes is None or dtype in implementation.dtypes)
    and (not implementation.single_device or target.num_devices == 1)
    and (variant is None or implementation.variants is None or variant in implementation.variants)
  )


def choose(op: str, model_cfg, dtype, *, variant: str | None = None, target: Target | None = None) -> str:
  """The name of the implementation of `op` to run (a key of `REGISTRY[op]`).

  model_cfg: the model sub-config (`config.model`). dtype: the dtype the op
  computes in. variant: for 'activation', the activation's name. target:
  defaults to `current_target()`. Raises ConfigError naming
  `model.attention_impl` when the implementation it names cannot run on the
  target.
  """
  table = REGISTRY[op]
  target = target or current_target()
  requested = model_cfg.get("attention_impl", "xla") if op == "attention" else "xla"
  if requested != "xla":
    implementation = table.get(requested)
    if implementation is None:
      raise ConfigError(f"model.attention_impl={requested!r} is not registered; choose one of {', '.join(table)}")
    if not _runs(implementation, target, dtype, variant):
      raise ConfigError(
        f"model.attention_impl={requested!r} runs on {', '.join(implementation.platforms or ())} "
        f"(in {', '.join(jax.numpy.dtype(d).name for d in implementation.dtypes or ()) or 'any dtype'}), "
        f"not on {target.platform} in {jax.numpy.dtype(dtype)}; "
        "set --config.model.attention_impl=xla"
      )
    return requested
  if model_cfg.get("cpu_kernels", True):  # runs saved before the option existed have it on
    for name, implementation in table.items():
      if implementation.automatic and _runs(implementation, target, dtype, variant) and implementation.available():
        return name
  return "xla"


def implementation(op: str, model_cfg, dtype, **kwargs) -> Implementation:
  """`REGISTRY[op][choose(op, model_cfg, dtype, **kwargs)]`."""
  return REGISTRY[op][choose(op, model_cfg, dtype, **kwargs)]
