"""Published accelerator figures (one table), and which entry a JAX device is.

`CHIPS` holds per-chip dense bf16 FLOP/s, HBM size and bandwidth, and
interconnect bandwidth. `jaxlm compile` (jaxlm/training/aot.py) reads it for its
roofline, and the trainer's MFU (jaxlm/training/flops.py) divides by its peak on TPU
and GPU, as MaxText and levanter do: a device measuring its own matmul peak
would count whatever its compiler reaches as 100%.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bf16 FLOP/s, HBM bytes, HBM and interconnect bytes/s."""

  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float  # bytes/s a chip can send over its links, all directions together


# Google Cloud TPU system-architecture pages and NVIDIA data sheets (dense, no sparsity; SXM parts).
CHIPS = {
  "v4": Chip(275e12, 32 * GIB, 1.2e12, 300e9),
  "v5e": Chip(197e12, 16 * GIB, 0.819e12, 200e9),
  "v5p": Chip(459e12, 95 * GIB, 2.765e12, 600e9),
  "v6e": Chip(918e12, 32 * GIB, 1.64e12, 448e9),
  "a100": Chip(312e12, 80e9, 2.039e12, 600e9),
  "h100": Chip(989e12, 80e9, 3.35e12, 900e9),
  "h200": Chip(989e12, 141e9, 4.8e12, 900e9),
}

# `jax.Device.device_kind` -> key of CHIPS. TPUs name v5e and v6e "lite" (and v5p plain "TPU v5");
# GPUs report the CUDA device name, e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200".
_DEVICE_KINDS = [
  (r"TPU v4", "v4"),
  (r"TPU v5 ?(lite|e)\b", "v5e"),
  (r"TPU v5p?$", "v5p"),
  (r"TPU v6 ?(lite|e)\b", "v6e"),
  (r"\bA100\b", "a100"),
  (r"\bH100\b", "h100"),
  (r"\bH200\b", "h200"),
]


def chip_for_device_kind(device_kind: str) -> str | None:
  """The CHIPS key of a `jax.Device.device_kind` string ('TPU v5 lite' -> 'v5e'); None for any other device
  (CPUs, and accelerators missing from the table). PCIe parts match their SXM entry, whose peak is higher."""
  for pattern, kind in _DEVICE_KINDS:
    if re.search(pattern, device_kind):
      return kind
  return None
