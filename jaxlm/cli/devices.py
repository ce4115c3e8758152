"""`jaxlm devices`: what this machine gives a run, in six lines, before one is started.

What JAX sees (platform, device kinds and count, process index and count), the versions that decide what runs
(jax, jaxlib, libtpu, CUDA), the memory per device, the peak FLOP/s that MFU divides by, the kernel each op
would run and the mesh a config would get. Each figure comes from the code a run itself calls, not from a
copy: `jaxlm.training.flops.PeakFlops` (with `jaxlm.training.chips`), `jaxlm.ops.dispatch.choose` and
`jaxlm.parallel.mesh.make_mesh`. A multi-process run's processes each print their own report, after
`jax.distributed` has joined them as `jaxlm train` does.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os

import jax
import jax.numpy as jnp

from jaxlm import ops
from jaxlm.errors import ConfigError
from jaxlm.parallel import distributed
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.training import flops
from jaxlm.training import step as train_step

GIB = 1024**3


def _package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cuda_versions(platform: str) -> dict[str, str | None]:
  """The jax CUDA plugin's version and, when JAX runs on a GPU, the CUDA runtime, cuDNN and driver versions."""
  plugin = next(
    (f"{name} {version}" for name in ("jax-cuda13-plugin", "jax-cuda12-plugin") if (version := _package_version(name))),
    None,
  )
  found = {"cuda_plugin": plugin, "cuda_runtime": None, "cudnn": None, "cuda_driver": None}
  if platform != "gpu":
    return found
  try:
    from jax._src.lib import cuda_versions  # private: the plugin's version queries (None without the plugin)

    runtime, cudnn, driver = (
      cuda_versions.cuda_runtime_get_version(),
      cuda_versions.cudnn_get_version(),
      cuda_versions.cuda_driver_get_version(),
    )
  except (ImportError, AttributeError, RuntimeError):  # ROCm, or another plugin's interface
    return found
  # CUDA writes versions as 1000 * major + 10 * minor, cuDNN 9 as 10000 * major + 100 * minor + patch.
  found.update(
    cuda_runtime=f"{runtime // 1000}.{runtime % 1000 // 10}",
    cudnn=f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}",
    cuda_driver=f"{driver // 1000}.{driver % 1000 // 10}",
  )
  return found


def _memory_per_device(device: jax.Device) -> tuple[float | None, str]:
  """(bytes, what they are) for one device: the allocator's limit on an accelerator, else the host's memory."""
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), "the allocator's limit"
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    return None, "unknown"
  return float(total), f"host memory, shared by the {jax.local_device_count()} device(s) of this process"


def report(config, source: str) -> dict:
  """What this process sees and what a run of `config` would get here, as a dict (`format_report` prints it).

  Joins the other processes first when the config or the environment says there are several
  (`jaxlm.parallel.distributed.maybe_initialize_distributed`, as `jaxlm train` does).

  Args:
    config: the whole config (the schema's defaults when no --config is given).
    source: where the config came from, for the report ('configs/tiny.py', or 'the defaults').

  Returns:
    A JSON-ready dict: versions, platform, devices (kind -> count), device_count, local_device_count,
    process_index, process_count, memory_per_device (bytes) and memory_source, peak_flops, peak_label and
    peak_measured, config, compute_dtype, kernel_devices (the devices the ops are chosen for: the mesh's),
    kernels (op -> implementation, or the error naming the key), and mesh (axis -> size) or mesh_error.
  """
  distributed.maybe_initialize_distributed(config)
  devices = jax.devices()
  platform = devices[0].platform
  memory, memory_source = _memory_per_device(jax.local_devices()[0])
  result = {
    "versions": {
      "jax": jax.__version__,
      "jaxlib": _package_version("jaxlib"),
      "libtpu": _package_version("libtpu"),
      **_cuda_versions(platform),
    },
    "platform": platform,
    "devices": dict(collections.Counter(device.device_kind for device in devices)),
    "device_count": len(devices),
    "local_device_count": jax.local_device_count(),
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "memory_per_device": memory,
    "memory_source": memory_source,
    "config": source,
  }
  try:
    mesh = mesh_lib.make_mesh(config)
    result["mesh"] = dict(mesh.shape)
    num_devices = mesh.size
  except ConfigError as e:
    result["mesh_error"] = str(e)
    num_devices = len(devices)
  dtype = train_step.compute_dtype(config)
  result["compute_dtype"] = jnp.dtype(dtype).name
  peak = flops.PeakFlops(config, num_devices)
  result.update(peak_flops=peak.flops, peak_label=peak.label, peak_measured=peak.measured)
  target = ops.Target(platform, num_devices)
  result.update(kernel_devices=num_devices, kernels={})
  for op in ops.dispatch.OPS:
    try:
      variant = config.model.mlp if op == "activation" else None
      result["kernels"][op] = ops.choose(op, config.model, dtype, variant=variant, target=target)
    except ValueError as e:  # an attention_impl that cannot run here: the line names the key and the fix
      result["kernels"][op] = f"error: {e}"
  return result


def _flops_text(value: float) -> str:
  scale, unit = (1e12, "TFLOP/s") if value >= 1e12 else (1e9, "GFLOP/s")
  return f"{value / scale:,.4g} {unit}"


def format_report(r: dict) -> str:
  """The report of `report` in six lines."""
  v = r["versions"]
  cuda = (
    f"CUDA {v['cuda_runtime']}, cuDNN {v['cudnn']}, driver {v['cuda_driver']} ({v['cuda_plugin']})"
    if v["cuda_runtime"]
    else (v["cuda_plugin"] or "no jax CUDA plugin")
  )
  kinds = ", ".join(f"{count} x {kind}" for kind, count in r["devices"].items())
  memory = f"{r['memory_per_device'] / GIB:,.1f} GiB ({r['memory_source']})" if r["memory_per_device"] else "unknown"
  mesh = (
    " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items()) if "mesh" in r else f"error: {r['mesh_error']}"
  )
  kernels = ", ".join(f"{op} {name}" for op, name in r["kernels"].items())
  return "\n".join(
    [
      f"jax {v['jax']}, jaxlib {v['jaxlib']}, libtpu {v['libtpu'] or 'not installed'}, {cuda}",
      f"devices: {kinds} on platform {r['platform']}, {r['local_device_count']} of them in this process; "
      f"process {r['process_index']} of {r['process_count']}",
      f"memory per device: {memory}",
      f"peak for MFU: {_flops_text(r['peak_flops'])}, {r['peak_label']}",
      f"kernels for {r['config']} ({r['compute_dtype']} on {r['kernel_devices']} {r['platform']} device(s)): {kernels}",
      f"mesh for {r['config']}: {mesh}",
    ]
  )
