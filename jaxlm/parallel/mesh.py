"""The device mesh: every ('data', 'fsdp', 'expert', 'tensor') mesh of jaxlm comes from one body here.

Three callers, one layout: `make_mesh(config)` for training and loading (the whole config's `mesh` sizes on
all devices), `make_mesh(config, devices, torus=True)` for a compile-only TPU slice (`jaxlm compile`), and
`mesh_of_sizes` for the `--mesh data=D,fsdp=F,expert=E,tensor=T` flag of generate, serve and export. `fit_mesh`
refits a saved run's config to the devices of this machine (`jaxlm eval`, `jaxlm verify`).

Flax is never imported, and the config code only by the functions that read a config: an exported artifact
builds its mesh with `mesh_of_sizes` wherever jax runs (`jaxlm.inference.export`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.errors import ConfigError

# 'expert' splits the experts of MoE layers and, under the default rules, the batch rows too (docs/moe.md);
# it sits inside data and fsdp so that the tokens MoE layers exchange travel between nearer devices.
AXES = ("data", "fsdp", "expert", "tensor")


def _build(sizes: dict[str, int], devices: Sequence[jax.Device], torus: bool) -> Mesh:
  """The Mesh of `sizes` (one per axis of AXES) over `devices`, in their order or laid out along the torus."""
  shape = [sizes[axis] for axis in AXES]
  if torus:
    from jax.experimental import mesh_utils  # local: only compiling for a TPU slice needs it

    # An axis no product of the torus's axes matches (tensor 4 on a 8x16x16 v4-4096) splits a physical axis, as
    # the slice's own layout allows; JAX does that only when no whole-axis assignment exists.
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), AXES)
  return Mesh(np.array(devices).reshape(shape), AXES)


def make_mesh(config, devices: Sequence[jax.Device] | None = None, torus: bool = False) -> Mesh:
  """The mesh with axes ('data', 'fsdp', 'expert', 'tensor') that the whole `config` asks for (`config.mesh`).

  Args:
    config: the whole config; its `mesh.data`, `mesh.fsdp`, `mesh.expert` and `mesh.tensor` (one may be -1:
      the rest).
    devices: the devices to lay out; default all of them, sorted by process, which keeps each process's
      devices contiguous along the data axes, as `jaxlm.data.pipeline.local_rows` lays out the batch.
    torus: lay the devices out along a TPU slice's torus (`jax.experimental.mesh_utils`), as `jaxlm compile`
      does for compile-only TPU devices.

  Returns:
    The `jax.sharding.Mesh`. Raises ConfigError when the sizes do not fill the devices.
  """
  from jaxlm import config as config_lib  # local: see the module docstring

  if devices is None:
    devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
  return _build(config_lib.mesh_shape(config, len(devices)), devices, torus)


def mesh_of_sizes(sizes: dict[str, int]) -> Mesh:
  """The mesh of the `--mesh` flag of generate, serve and export, on the first D*F*E*T devices.

  Args:
    sizes: {'data': D, 'fsdp': F, 'expert': E, 'tensor': T}, as `jaxlm.cli.main.mesh_sizes` parses the flag
      (an axis left out is 1).

  Returns:
    The `jax.sharding.Mesh`. Raises ConfigError naming --mesh when fewer devices are visible.
  """
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  count = math.prod(sizes[axis] for axis in AXES)
  if count > jax.device_count():
    raise ConfigError(
      f"--mesh {','.join(f'{axis}={sizes[axis]}' for axis in AXES)} needs {count} devices but "
      f"{jax.device_count()} are visible; choose sizes whose product is at most that"
    )
  return _build(sizes, jax.devices()[:count], torus=False)


def fit_mesh(config, device_count: int):
  """A copy of a saved run's whole `config` that runs on `device_count` devices; `config` is not changed.

  Args:
    config: the whole config, e.g. as the run saved it.
    device_count: the devices of this machine.

  Returns:
    The copy: its mesh is the run's when that fits `device_count`, else all devices on the data axis; its
    `eval.batch_size` is rounded up to divide over the data-parallel devices.
  """
  from jaxlm import config as config_lib  # local: see the module docstring

  config = config.copy_and_resolve_references()
  try:
    config_lib.mesh_shape(config, device_count)
  except ConfigError:
    config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = -1, 1, 1, 1
  data_parallel = config_lib.data_parallel_size(config, device_count)
  config.eval.batch_size = -(-config.eval.batch_size // data_parallel) * data_parallel
  return config
