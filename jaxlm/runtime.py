"""Process-wide settings that the `jaxlm` command applies before JAX starts, and that scripts may apply too.

This module imports only the standard library (JAX's hardware scan and backend table are imported inside
functions), so the command can call it first, before anything starts threads. Importing it changes nothing; calling its functions
does, and each says what.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os


def has_accelerator() -> bool:
  """An accelerator that an installed JAX plugin would drive: TPU chips with libtpu, GPUs with a jax_plugins
  package. A plugin alone is not enough: CPU hosts install libtpu to compile for TPU slices ahead of time."""
  tpu = importlib.util.find_spec("libtpu") and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  gpu = importlib.util.find_spec("jax_plugins") and (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))
  return bool(tpu or gpu)


def retain_freed_memory() -> bool:
  """On a host without an accelerator, with glibc, keeps freed heap memory in the process; True if it did.

  XLA:CPU allocates every step's temporaries as one block (650 MB at the
  reference config) and frees it after the step. glibc maps such a block
  fresh from the kernel each time, so each step first-touched ~180,000 pages
  (7-14% of the reference step; BENCHMARKS.md, "Fourth pass"). With one
  arena, no mmap and no trimming, the block comes from the heap and its pages
  stay mapped. The price: the process keeps its peak heap until it exits.
  `jaxlm` commands call this before JAX starts its threads (an arena is
  chosen per thread, at its first allocation); in your own program, call it
  first. Hosts with an accelerator (`has_accelerator`) are left alone, since
  their host memory is mostly data-loading buffers, read by many threads at once.
  """
  if has_accelerator():
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  # mallopt's parameters from glibc's malloc.h: M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD.
  return all(mallopt(param, value) == 1 for param, value in ((-8, 1), (-4, 0), (-1, 2**31 - 1)))


def tpu_chips_on_host() -> bool:
  """Whether this host has TPU chips: a TPU device file (/dev/accel*, /dev/vfio/N), or a PCI device of Google's
  vendor id (0x1ae0) with a TPU's device id, which is the scan JAX itself runs before it sets up libtpu (the vendor
  id alone is no proof: every Compute Engine VM's gVNIC network card has it). True where the scan cannot run."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  try:
    from jax._src import hardware_utils  # private, but the PCI scan JAX's own TPU set-up (cloud_tpu_init) runs

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError, OSError):
    return True
  return chips > 0


def skip_tpu_backend_without_tpu() -> bool:
  """On a host without TPU chips, keeps JAX from starting its TPU backend in this process; True if it did.

  JAX tries every backend it knows when it first looks for devices, the TPU's among them whenever libtpu is
  installed (jaxlm's test and aot extras install it, so that CPU hosts compile for TPU slices). On a host
  without chips libtpu then writes 5-7 lines to the process's stderr ("Failed to find host bounds for
  accelerator type", "E0000 ... TPU_WORKER_HOSTNAMES", "Source Location Trace") before JAX quietly falls back
  to the next backend, so every command printed them. libtpu's log levels (TPU_MIN_LOG_LEVEL,
  TPU_STDERR_LOG_LEVEL) and TPU_SKIP_MDS_QUERY=1 (which JAX sets itself on such a host) do not stop them, and
  JAX_PLATFORMS=cpu would hide a GPU too. So this makes JAX's TPU backend fail at once, before libtpu starts, as
  quietly as libtpu's own failure, in this process only (nothing is inherited by child processes). The platform
  stays registered, since JAX's own modules register TPU lowerings on import. GPUs and the CPU are found as
  before, and compiling for a TPU slice (`jax.experimental.topologies`, `jaxlm compile`) loads libtpu by itself
  and still works.

  Left alone: a host with TPU chips (`tpu_chips_on_host`), a JAX_PLATFORMS that the user set, and a process
  whose backends have started already. Call it before anything looks for devices.
  """
  if os.environ.get("JAX_PLATFORMS") or tpu_chips_on_host():
    return False
  try:
    from jax._src import xla_bridge  # private: the table of backends to try, where 'tpu' is entered at import

    registration = xla_bridge._backend_factories.get("tpu")
    if registration is None or xla_bridge.backends_are_initialized():
      return False
    registration.factory = _no_tpu_chips
    return True
  except (ImportError, AttributeError):  # another JAX: the lines come back, nothing else changes
    return False


def _no_tpu_chips():
  raise RuntimeError("no TPU chips on this host (jaxlm.runtime.skip_tpu_backend_without_tpu)")
