"""Published accelerator figures (one table), which entry a JAX device is, and the TPU slices by name.

`CHIPS` holds per-chip dense bf16 FLOP/s, HBM size and bandwidth, and
interconnect bandwidth. `jaxlm compile` (jaxlm/training/aot.py) reads it for its
roofline, and the trainer's MFU (jaxlm/training/flops.py) divides by its peak on TPU
and GPU, as MaxText and levanter do: a device measuring its own matmul peak
would count whatever its compiler reaches as 100%.

`TPU_GENERATIONS` is the one table of slice names: both spellings (`v5e-16`
and Google Cloud's `v5litepod-16`, or the shape `v5e:4x4`), chip counts and
shapes, the Cloud accelerator type and the default TPU VM runtime. `jaxlm
compile` reads it through `parse_slice`, and tpu/create.sh runs this file as a
script (it imports only the standard library, so no JAX is needed):
`python3 jaxlm/training/chips.py v5e-16` prints `v5litepod-16 v2-alpha-tpuv5-lite`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

try:
  from jaxlm.errors import JaxlmError
except ImportError:  # run as a plain script (tpu/create.sh) where jaxlm is not importable; only the CLI needs it

  class JaxlmError(Exception):
    """Stands in for jaxlm.errors.JaxlmError where jaxlm cannot be imported."""


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


class SliceError(JaxlmError, ValueError):
  """A slice name that is not one Google Cloud builds; the message is one line naming the accepted names."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation's names and slices.

  names: the spellings accepted before '-N' or ':AxB', jaxlm's first ('v5e', 'v5litepod').
  cloud: the prefix of Google Cloud's accelerator type ('v5litepod' in 'v5litepod-16').
  runtime: the TPU VM image tpu/create.sh asks for by default (Google's recommended one for JAX).
  cores_per_chip: TensorCores per chip; Cloud names count cores for v2-v5p ('v4-8' is 4 chips), chips for v5e/v6e.
  libtpu: the prefix of libtpu's topology name ('v5' in 'v5:2x2x1'), or '' where `jaxlm compile` cannot target it.
  shapes: chips -> the slice shape Cloud builds for that many chips; empty where jaxlm does not know them.
  """

  names: tuple[str, ...]
  cloud: str
  runtime: str
  cores_per_chip: int
  libtpu: str = ""
  shapes: dict = dataclasses.field(default_factory=dict)


_TORUS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_TORUS_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
}

# Google Cloud TPU pages "TPU versions" and "TPU software versions"; v2 and v3 are for tpu/create.sh only.
TPU_GENERATIONS = (
  TpuGeneration(("v2",), "v2", "tpu-ubuntu2204-base", 2),
  TpuGeneration(("v3",), "v3", "tpu-ubuntu2204-base", 2),
  TpuGeneration(("v4",), "v4", "tpu-ubuntu2204-base", 2, "v4", _TORUS_3D),
  TpuGeneration(("v5e", "v5litepod"), "v5litepod", "v2-alpha-tpuv5-lite", 1, "v5e", _TORUS_2D),
  TpuGeneration(("v5p", "v5"), "v5p", "v2-alpha-tpuv5", 2, "v5", _TORUS_3D),
  TpuGeneration(("v6e",), "v6e", "v2-alpha-tpuv6e", 1, "v6e", _TORUS_2D),
)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `kind` (the CHIPS key, 'v5e'), `chips`, `shape` (None where unknown), `name` (jaxlm's
  spelling, 'v5e-16'), `accelerator_type` (Cloud's, 'v5litepod-16'), `runtime` (the default TPU VM image)
  `topology` (libtpu's name, 'v5e:4x4'; '' where `jaxlm compile` cannot target the generation) and
  `cores_per_chip`."""

  kind: str
  chips: int
  shape: tuple[int, ...] | None
  name: str
  accelerator_type: str
  runtime: str
  topology: str
  cores_per_chip: int


def _generation(prefix: str) -> TpuGeneration | None:
  return next((g for g in TPU_GENERATIONS if prefix.lower() in g.names), None)


def parse_slice(name: str) -> Slice:
  """A slice by either Cloud name ('v5e-16' or 'v5litepod-16': chips for v5e/v6e, TensorCores for v2-v5p) or
  shape ('v5e:4x4', 'v5litepod:4x4', 'v5p:2x2x2', libtpu's 'v5:2x2x2').

  Returns:
    The `Slice`. Raises SliceError (one line, listing the accepted names) for anything else: an unknown
    generation, a count or shape Cloud does not build (v5e-3, v5e:3x3, v5e:0x4).
  """
  match = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
  generation = _generation(match.group(1)) if match else None
  if generation is None:
    raise SliceError(
      f"'{name}' is not a TPU slice; write it as v5e-16 (or v5litepod-16), v5p-32, v4-8, v6e-8, or a shape "
      "such as v5e:4x4"
    )
  jaxlm_name = generation.names[0]
  if match.group(2) is not None:
    cores = int(match.group(2))
    chips = cores // generation.cores_per_chip if cores % generation.cores_per_chip == 0 else 0
    if chips < 1 or (generation.shapes and chips not in generation.shapes):
      sizes = ", ".join(f"{jaxlm_name}-{c * generation.cores_per_chip}" for c in generation.shapes) or "v2-8"
      raise SliceError(f"{name}: no such slice; choose one of {sizes}")
    shape = generation.shapes.get(chips)
  else:
    shape = tuple(int(d) for d in match.group(3).split("x"))
    chips = math.prod(shape)
    built = generation.shapes.get(chips)
    if built is None or sorted(built) != sorted(shape):
      shapes = ", ".join(f"{jaxlm_name}:{'x'.join(map(str, s))}" for s in generation.shapes.values())
      raise SliceError(f"{name}: no such slice shape; choose one of {shapes or 'the -N names'}")
  count = chips * generation.cores_per_chip
  kind = jaxlm_name if jaxlm_name in CHIPS else ""
  topology = f"{generation.libtpu}:{'x'.join(map(str, shape))}" if generation.libtpu and shape else ""
  cloud_name = f"{generation.cloud}-{count}"
  return Slice(
    kind, chips, shape, f"{jaxlm_name}-{count}", cloud_name, generation.runtime, topology, generation.cores_per_chip
  )


def main(argv: list[str]) -> int:
  """`python3 jaxlm/training/chips.py SLICE`: prints Cloud's accelerator type and the default runtime, for
  tpu/create.sh. Exit 2 with one line on stderr for a known generation's bad size, 3 for an unknown one."""
  if len(argv) != 1:
    print("usage: chips.py SLICE", file=sys.stderr)
    return 2
  try:
    found = parse_slice(argv[0])
  except SliceError as e:
    print(e, file=sys.stderr)
    return 2 if _generation(re.split(r"[-:]", argv[0].strip())[0]) else 3
  print(found.accelerator_type, found.runtime)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
