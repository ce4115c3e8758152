"""Checksums of a checkpoint's arrays, computed on the devices, independent of the sharding.

Orbax 0.12's zarr3 layout puts a crc32c codec on each shard's *index* only; the
array bytes themselves carry no checksum, and neither Orbax nor TensorStore
offers one for data here. So jaxlm records its own at save time and checks it
after every restore.

The checksum of an array is a 64-bit position-weighted sum of its bit patterns
(two 32-bit lanes), reduced with wrap-around uint32 arithmetic. Addition mod
2^32 is exact and order-free, so the value is the same whatever the mesh, the
device count or the process count at save and at restore: a checkpoint saved
with fsdp=8 verifies after restoring onto one device. Every weight is odd, so
any single flipped bit changes lane one; lane two hashes the words first, so
patterned damage that cancels in one lane does not cancel in the other. It
runs as one jitted reduction over the arrays where they already live; no host
gathers an array.
"""

from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.storage import fs

ALGORITHM = "jaxlm-fingerprint-v1"  # recorded with the checksums, so a future change is detected as such
_MASK = 0xFFFFFFFF


def _mix(x_u32: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: spreads every input bit over the whole word."""
  x_u32 = x_u32 ^ (x_u32 >> 16)
  x_u32 = x_u32 * jnp.uint32(0x85EBCA6B)
  x_u32 = x_u32 ^ (x_u32 >> 13)
  x_u32 = x_u32 * jnp.uint32(0xC2B2AE35)
  return x_u32 ^ (x_u32 >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32, same shape (8-byte types gain a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2] for one array; the flat position enters through iotas, so nothing is reshaped."""
  words = _words(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = (stride * words.shape[axis]) & _MASK
  weight = _mix(position ^ jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
  lane_one = jnp.sum(words * weight, dtype=jnp.uint32)
  lane_two = jnp.sum(_mix(words ^ weight) * (weight ^ jnp.uint32(0x7F4A7C15)), dtype=jnp.uint32)
  return jnp.stack([lane_one, lane_two])


def _finite(x: jax.Array) -> jax.Array:
  """False when a floating array holds inf/NaN, or values so large that their squares overflow float32."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.array(True)
  return jnp.isfinite(jnp.sum(jnp.square(x.astype(jnp.float32))))


_tree_fingerprints = jax.jit(lambda tree: jax.tree.map(lambda x: (_array_fingerprint(x), _finite(x)), tree))


def leaf_name(path) -> str:
  """'params/decoder/layer_0/kernel' for a `jax.tree_util` key path."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _named_leaves(tree) -> dict:
  return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe(tree) -> dict[str, dict]:
  """{array name: {'shape', 'dtype', 'checksum', 'finite'}} for a tree of jax arrays.

  Every process calls it (the reduction is collective). 'finite' is False when
  the array's float32 sum of squares is not finite, which flags overflowing
  states (values near 1e38) as well as NaN and inf.
  """
  leaves = _named_leaves(tree)
  arrays = {name: leaf for name, leaf in leaves.items() if isinstance(leaf, jax.Array)}
  results = jax.device_get(_tree_fingerprints(arrays))
  return {
    name: {
      "shape": list(leaf.shape),
      "dtype": str(leaf.dtype),
      "checksum": "%08x%08x" % tuple(int(v) for v in np.asarray(results[name][0])),
      "finite": bool(results[name][1]),
    }
    for name, leaf in arrays.items()
  }


def mismatch_with_target(records: dict[str, dict], target, partial: bool) -> str | None:
  """Why the saved arrays cannot fill `target` (a tree of ShapeDtypeStruct), or None if they can."""
  wanted = _named_leaves(target)
  missing = sorted(set(wanted) - set(records))
  if missing:
    return f"the checkpoint lacks {len(missing)} array(s) this model needs, e.g. '{missing[0]}'"
  extra = sorted(set(records) - set(wanted))
  if extra and not partial:
    return f"the checkpoint has {len(extra)} array(s) this model lacks, e.g. '{extra[0]}'"
  for name, leaf in wanted.items():
    if list(leaf.shape) != records[name]["shape"]:
      return (
        f"array '{name}' was saved with shape {tuple(records[name]['shape'])}, this model needs {tuple(leaf.shape)}"
      )
  return None


def first_damaged(records: dict[str, dict], restored) -> str | None:
  """The first restored array whose checksum differs from the saved one, described; None if all match."""
  for name, record in describe(restored).items():
    saved = records.get(name)
    # A restore that casts to another dtype changes the bits; such arrays cannot be compared.
    if saved is not None and saved["dtype"] == record["dtype"] and saved["checksum"] != record["checksum"]:
      return (
        f"array '{name}' does not match the checksum recorded at save time "
        f"(saved {saved['checksum']}, read {record['checksum']})"
      )
  return None


# File checksums: the arrays' checksums prove what a restore returns; these also cover bytes a restore does not
# read (an optimizer state that `eval` skips, regions of an OCDBT file no array uses), and name the file.
FILE_MANIFEST = "jaxlm_files.json"


def _file_crc32(location: str) -> int:
  crc = 0
  with fs.path(location).open("rb") as file:
    while chunk := file.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(folder) -> dict[str, str]:
  """{name relative to `folder`: location} of every file under `folder` (a local path or a URL)."""
  prefix = os.fspath(folder).rstrip("/") + "/"
  return {
    location[len(prefix) :]: location
    for location in fs.glob(prefix + "**")
    if not location.endswith("/" + FILE_MANIFEST)
  }


def write_file_manifest(folder) -> None:
  """Records the size and CRC-32 of every file under a finished checkpoint step `folder` in FILE_MANIFEST."""
  files = {name: [fs.size(location), _file_crc32(location)] for name, location in sorted(_files(folder).items())}
  fs.write_text(fs.join(folder, FILE_MANIFEST), json.dumps({"algorithm": "crc32", "files": files}))


def file_problem(folder) -> str | None:
  """What differs between the files under `folder` and its FILE_MANIFEST; None if they match or it has none."""
  manifest = fs.path(fs.join(folder, FILE_MANIFEST))
  if not manifest.exists():
    return None
  try:
    files = json.loads(manifest.read_bytes().decode("utf-8"))["files"]
    entries = [(str(name), int(size), int(crc)) for name, (size, crc) in files.items()]
  except (ValueError, KeyError, TypeError, AttributeError):  # garbled bytes, JSON or entries (UnicodeDecodeError too)
    return f"its file list '{FILE_MANIFEST}' is unreadable"
  present = _files(folder)
  for name, size, crc in entries:
    if name not in present:
      return f"the file '{name}' is missing"
    if fs.size(present[name]) != size:
      return f"the file '{name}' has {fs.size(present[name])} bytes, {size} were saved"
    found = _file_crc32(present[name])
    if found != crc:
      return f"the file '{name}' changed since it was saved (CRC-32 {found:08x}, saved {crc:08x})"
  return None
