"""Process-wide settings that the `jaxlm` command applies before JAX starts, and that scripts may apply too.

This module imports only the standard library (JAX's own hardware scan is imported inside a function), so the
command can call it first, before anything starts threads. Importing it changes nothing; calling its functions
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


def skip_tpu_metadata_query_without_tpu() -> None:
  """Sets TPU_SKIP_MDS_QUERY=1 (process-wide, inherited by child processes) on a host without TPU chips.

  libtpu, once installed (jaxlm's test and aot extras install it), is loaded at JAX's start on every host and
  asks the cloud metadata server for the TPU's type; where there is none it prints four warning lines on every
  command. Skipping the query changes nothing else there. Hosts with TPU chips, and `jaxlm compile`, which
  configures libtpu itself (jaxlm/training/aot.py), are left alone.
  """
  try:
    from jax._src import hardware_utils  # private, but the PCI scan JAX itself runs before choosing the TPU

    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError, OSError):
    return
  if chips == 0:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
