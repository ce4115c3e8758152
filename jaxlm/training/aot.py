"""Ahead-of-time compilation for a TPU slice from any machine: does a config fit, and how fast might it run.

`jaxlm compile --config C --topology v5e-16` builds the real train step
(`train_step.setup` + `train_step.make_train_step`) on a `Mesh` of compile-only TPU
devices from `jax.experimental.topologies.get_topology_desc`, lowers it on
`ShapeDtypeStruct`s carrying the step's `NamedSharding`s, and compiles it
with libtpu. Nothing is allocated and no TPU is needed; MaxText's
`train_compile.py` works the same way.

The report, per chip: parameters and optimizer state (from the state's
shardings), activations and temporaries (XLA's `memory_analysis()`), their
sum against the chip's HBM, and a roofline estimate of the step time.

Why a roofline of our own: XLA's `cost_analysis()` counts a while loop's
body once, so with scanned layers and micro-batches its `flops` are far too
low and its `optimal_seconds` came out negative (FIELD-NOTES). The estimate
takes the largest of three times, each a lower bound, assuming perfect
overlap:
  compute: the FLOPs of `metrics.flops_per_token` (plus what the remat
           policy recomputes) over the chip's published bf16 peak;
  memory:  the HBM traffic implied by `memory_analysis()` (arguments and
           outputs once, temporaries written and read once per micro-batch)
           over its bandwidth;
  network: the collectives the mesh implies (fsdp gathers and scatters the
           weights, tensor all-reduces activations, data all-reduces
           gradients, expert gathers and scatters each MoE layer's tokens)
           over the chip's ICI bandwidth.
MFU is the model FLOPs (without recomputation) over that time and the peak:
an upper bound, not a measurement.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.models import layers as layers_lib
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import chips  # the slice names (tpu/create.sh reads them too)
from jaxlm.training import flops as metrics
from jaxlm.training import memory as memory_lib
from jaxlm.training.chips import (  # the one table of published chip figures (the trainer's MFU reads it too)
  CHIPS,
  GIB,
  Chip,
)


class CompileError(config_lib.ConfigError):
  """A bad --topology, or no libtpu; one line naming the fix (a ConfigError, so the CLI prints it and exits 2)."""


def target_slice(name: str) -> chips.Slice:
  """A slice `jaxlm compile` can target, by any spelling `chips.parse_slice` accepts ('v5e-16', 'v5litepod-16',
  'v5e:4x4'). Raises CompileError (one line naming --topology) for a name Cloud does not build or a
  generation libtpu cannot target (v2, v3)."""
  try:
    found = chips.parse_slice(name)
  except chips.SliceError as e:
    raise CompileError(f"--topology {e}") from None
  if not found.topology:
    raise CompileError(f"--topology {name}: jaxlm compile targets v4, v5e, v5p and v6e slices only")
  return found


def parse_topology(name: str) -> tuple[str, str, int]:
  """(chip kind, libtpu topology name such as 'v5e:4x4', number of chips) of `target_slice(name)`."""
  found = target_slice(name)
  return found.kind, found.topology, found.chips


def tpu_devices(name: str) -> tuple[str, list]:
  """Compile-only TPU devices of a slice: (chip kind, devices). Needs libtpu, not a TPU."""
  found = target_slice(name)
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError(
      f"compiling for TPU needs libtpu; install it with "
      f"pip install 'jax[tpu]=={jax.__version__}' (or pip install -e '.[aot]')"
    )
  _compile_only_libtpu(found.accelerator_type)
  from jax.experimental import topologies  # local: loads the TPU plugin

  shape, count = found.shape, found.chips
  dims = len(shape)
  # As MaxText's accelerator_to_spec_map: 2x2 chips per host; 16-chip dimensions wrap into a torus.
  devices = topologies.get_topology_desc(
    topology_name=found.topology,
    platform="tpu",
    num_slices=1,
    chip_config_name="megacore" if found.cores_per_chip == 2 else "default",
    chips_per_host_bounds=(2, 2, 1) if dims == 3 or count >= 4 else (*shape, 1),
    wrap=tuple(d >= 16 for d in shape) + (False,) * (3 - dims) if dims == 2 else (count >= 64,) * 3,
  ).devices
  return found.kind, devices


def _compile_only_libtpu(accelerator_type: str) -> None:
  """Settings for libtpu on a host without TPUs, where it only compiles.

  Without a host description libtpu logs three warnings (harmless when only
  compiling), and it takes a machine-wide lock (/tmp/libtpu_lockfile) that
  would make a second compiling process fail. Set only when this machine has
  no TPU (no /dev/accel*, no /dev/vfio/N), so a TPU VM's runtime keeps its own.
  """
  import glob

  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def check_report_path(path: str) -> None:
  """CompileError unless `path` can take the --json report: not a folder, in a folder that exists."""
  import pathlib

  where = pathlib.Path(path)
  if where.is_dir():
    raise CompileError(f"--json {path} is a folder; pass a file path such as {where / 'report.json'}")
  if not where.parent.is_dir():
    raise CompileError(f"--json {path}: folder {where.parent} does not exist; create it or pass another path")


def check_divisible(abstract_tree, sharding_tree) -> None:
  """CompileError naming the first array whose sharded dimension the mesh does not divide (else XLA's traceback)."""
  try:
    sharding.check_divisible(abstract_tree, sharding_tree, "--config.mesh.*")
  except config_lib.ConfigError as e:
    raise CompileError(str(e)) from None


def _remat_factors(policy: str) -> tuple[float, float]:
  """(matmul, attention) FLOPs executed per model FLOP: what the backward pass recomputes.

  `full` reruns the whole forward (2 of the 6 FLOPs per weight, 4 of 12 for
  attention); `dots_no_batch` saves weight matmuls but reruns the attention
  products; `dots` and `none` rerun no matmul.
  """
  return {"full": (8 / 6, 16 / 12), "dots_no_batch": (1.0, 16 / 12)}.get(policy, (1.0, 1.0))


def estimate(
  config, chip: Chip, num_chips: int, mesh_sizes: dict, param_bytes: int, memory: memory_lib.StepMemory
) -> dict:
  """The roofline of the module docstring, per chip: times in seconds, MFU and tokens per second."""
  m = config.model
  seq = config.data.seq_len
  tokens_per_chip = config.train.global_batch_size * seq / num_chips
  matmul_flops = 6 * metrics.matmul_params(m)
  attention_flops = metrics.flops_per_token(m, seq) - matmul_flops
  matmul_factor, attention_factor = _remat_factors(m.remat_policy)
  model_flops = metrics.flops_per_token(m, seq) * tokens_per_chip
  executed_flops = (matmul_flops * matmul_factor + attention_flops * attention_factor) * tokens_per_chip
  compute_s = executed_flops / chip.peak_flops

  # Each micro-batch writes and reads its own activations: the temporaries are reused, not traffic saved.
  hbm_bytes = memory.arguments + memory.outputs + 2 * memory.temporaries * config.train.num_micro_batches
  memory_s = hbm_bytes / chip.hbm_bandwidth

  compute_bytes = jnp.dtype(m.dtype).itemsize
  # Every expert's weights move, not only the active ones: a chip holds 1/expert of them.
  experts = metrics.projection_params(m).get("experts", 0) + metrics.inactive_params(m)
  micro = config.train.num_micro_batches
  f, t, d, e = mesh_sizes["fsdp"], mesh_sizes["tensor"], mesh_sizes["data"], mesh_sizes.get("expert", 1)
  params = metrics.matmul_params(m) - metrics.projection_params(m).get("experts", 0) + experts / e
  # fsdp: per micro-batch, gather the weights for forward and backward and reduce-scatter their gradients.
  fsdp_bytes = micro * (f - 1) / f * params / t * (2 * compute_bytes + 4) if f > 1 else 0.0
  # expert: per MoE layer an all-gather of the group's tokens and a reduce-scatter of their outputs forward,
  # the same two transposed backward (jaxlm.ops.moe.moe_ffn): the rows of the e-1 peers each time.
  layers = families.get(m.family).attention_layers(m)[0]  # every self-attention layer, encoder and decoder
  moe_layers = sum(layers_lib.is_moe_layer(m, i) for i in range(layers))
  expert_bytes = 4 * moe_layers * (e - 1) * tokens_per_chip * m.d_model * compute_bytes if e > 1 else 0.0
  # tensor: two all-reduces of the layer's activations forward, two backward (Megatron), 2(t-1)/t each.
  activation = tokens_per_chip * t * m.d_model * compute_bytes  # a tensor group shares its rows
  tensor_bytes = 4 * layers * 2 * (t - 1) / t * activation if t > 1 else 0.0
  # data: one all-reduce of the float32 gradients each step.
  data_bytes = 2 * (d - 1) / d * param_bytes if d > 1 else 0.0
  network_s = (fsdp_bytes + tensor_bytes + data_bytes + expert_bytes) / chip.ici_bandwidth

  step_s = max(compute_s, memory_s, network_s)
  bound = {compute_s: "compute", memory_s: "memory", network_s: "network"}[step_s]
  return {
    "compute_s": compute_s,
    "memory_s": memory_s,
    "network_s": network_s,
    "step_s": step_s,
    "bound": bound,
    "mfu": model_flops / (step_s * chip.peak_flops),
    "tokens_per_s": config.train.global_batch_size * seq / step_s,
  }


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_train_step(config, topology: str) -> dict:
  """Compiles the train step of `config` (whole config) for `topology`; returns the report as a dict.

  Keys: topology, chip, chips, mesh, compile_s, fits, and when XLA accepted
  the program: params_bytes, optimizer_bytes, batch_bytes, temp_bytes,
  peak_bytes, hbm_bytes and the `estimate` keys. When XLA refused it for
  lack of memory: fits False and `error`, XLA's one-line reason.
  """
  from jaxlm.training import step as train_step  # local: the model stack loads only when compiling

  kind, devices = tpu_devices(topology)
  chip = CHIPS[kind]
  config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config, devices, torus=True)
  mesh_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  s = train_step.setup(config, mesh)
  check_divisible(s.abstract_state, s.state_shardings)
  _, batch, _ = train_step.abstract_step_arguments(s)
  report = {
    "topology": topology,
    "chip": kind,
    "chips": len(devices),
    "mesh": mesh_sizes,
    "remat_policy": config.model.remat_policy,
    "dtype": config.model.dtype,
    "global_batch_size": config.train.global_batch_size,
    "num_micro_batches": config.train.num_micro_batches,
    "hbm_bytes": chip.hbm_bytes,
  }
  start = time.perf_counter()
  try:
    compiled = train_step.compile_train_step(s).compiled
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    report.update(compile_s=time.perf_counter() - start, fits=False, error=memory_lib.xla_oom_line(message))
    return report
  report["compile_s"] = time.perf_counter() - start
  memory = memory_lib.step_memory(compiled)
  param_bytes = sharding.shard_bytes(s.abstract_state.params, s.state_shardings.params)
  report.update(
    params_bytes=param_bytes,
    optimizer_bytes=sharding.shard_bytes(s.abstract_state.opt_state, s.state_shardings.opt_state),
    batch_bytes=sharding.shard_bytes(batch, jax.tree.map(lambda a: a.sharding, batch)),
    temp_bytes=memory.temporaries,
    # Pallas kernels lower to Mosaic custom calls (attention_impl=splash); XLA's own code has none.
    tpu_custom_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'),
    # The same sum `jaxlm train` checks a step by: all live at once, generated code included.
    peak_bytes=memory.peak,
  )
  report["fits"] = report["peak_bytes"] <= chip.hbm_bytes
  report.update(estimate(config, chip, len(devices), mesh_sizes, param_bytes, memory))
  return report


def compile_decode(config, topology: str, batch_size: int, prompt_len: int = 0) -> dict:
  """Compiles prefill and the one-token decode step of `config` (whole config) for `topology`.

  Parameters keep the train shardings (the logical rules); the KV cache is
  sharded along batch (data axes) and key/value heads (tensor), its other
  per-row arrays along batch. The cache holds `model.max_len` slots; the
  prompt is `prompt_len` tokens (0: half the context). Returns the report:
  params_bytes, cache_bytes and, for 'prefill' and 'step', temp_bytes and
  peak_bytes; fits; and the decode step's HBM-bound tokens per second
  (parameters and cache read once per step).
  """
  from jaxlm.inference import decode  # local, as in compile_train_step
  from jaxlm.training import step as train_step

  if batch_size < 1:
    raise CompileError(f"--batch-size {batch_size}: decode needs at least one row; pass a positive --batch-size")
  if not 0 <= prompt_len < config.model.max_len:
    raise CompileError(
      f"--prompt-len {prompt_len}: a prompt takes 1 to {config.model.max_len - 1} tokens (model.max_len "
      f"{config.model.max_len} less one to generate); pass a --prompt-len in that range, or 0 for half the context"
    )
  kind, devices = tpu_devices(topology)
  chip = CHIPS[kind]
  config_lib.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config, devices, torus=True)
  s = train_step.setup(config, mesh)
  adapter = decode.adapter_for(config.model)
  cache_len, prompt_len = config.model.max_len, prompt_len or config.model.max_len // 2
  batch_axes = nn.logical_to_mesh_axes(("batch",), s.rules)[0]

  check_divisible(s.abstract_state.params, s.state_shardings.params)
  params = _abstract(s.abstract_state.params, s.state_shardings.params)
  rows = NamedSharding(mesh, PartitionSpec(batch_axes))
  prompt = {
    "tokens_BxP": jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32, sharding=rows),
    "lengths_B": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows),
  }
  prefill = functools.partial(adapter.prefill, cache_len=cache_len)
  with jax.set_mesh(mesh), nn.logical_axis_rules(s.rules):
    _, _, abstract_state = jax.eval_shape(prefill, params, prompt)
  state_shardings = decode.state_shardings(mesh, s.rules, abstract_state)  # the cache as decode declares it
  state = _abstract(abstract_state, state_shardings)
  tokens = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)
  report = {
    "topology": topology,
    "chip": kind,
    "chips": len(devices),
    "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
    "dtype": config.model.dtype,
    "param_dtype": config.model.param_dtype,
    "batch_size": batch_size,
    "prompt_len": prompt_len,
    "cache_len": cache_len,
    "hbm_bytes": chip.hbm_bytes,
    "params_bytes": sharding.shard_bytes(s.abstract_state.params, s.state_shardings.params),
    "cache_bytes": sharding.shard_bytes(abstract_state["cache"], state_shardings["cache"]),
  }
  start = time.perf_counter()
  programs = {
    "prefill": train_step.under_mesh(
      mesh, s.rules, jax.jit(prefill, out_shardings=(None, None, state_shardings))
    ).lower(params, prompt),
    "step": train_step.under_mesh(
      mesh, s.rules, jax.jit(adapter.step, out_shardings=(None, state_shardings), donate_argnums=(1,))
    ).lower(params, state, tokens),
  }
  report["fits"] = True
  for name, lowered in programs.items():
    try:
      memory = memory_lib.step_memory(lowered.compile())
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report.update(fits=False, error=f"{name}: {memory_lib.xla_oom_line(str(e))}")
      continue
    report[name] = {"temp_bytes": memory.temporaries, "peak_bytes": memory.peak}
    report["fits"] = report["fits"] and memory.peak <= chip.hbm_bytes
  report["compile_s"] = time.perf_counter() - start
  step_s = (report["params_bytes"] + report["cache_bytes"]) / chip.hbm_bandwidth
  report["tokens_per_s"] = batch_size / step_s
  return report


def format_decode_report(r: dict) -> str:
  """The lines `jaxlm compile --decode` prints for a `compile_decode` report."""
  size = functools.partial(memory_lib.format_bytes, decimals=2)
  mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items())
  lines = [
    f"{r['topology']}: {r['chips']} x {r['chip']} chips, mesh {mesh}; decode batch {r['batch_size']}, "
    f"prompt {r['prompt_len']}, cache {r['cache_len']} slots; {r['param_dtype']} weights, {r['dtype']} compute; "
    f"compiled in {r['compile_s']:.1f} s",
    "per chip:",
    f"  {'parameters':30s}{size(r['params_bytes']):>12s}",
    f"  {'KV cache':30s}{size(r['cache_bytes']):>12s}",
  ]
  for name in ("prefill", "step"):
    if name in r:
      lines.append(
        f"  {name + ' temporaries':30s}{size(r[name]['temp_bytes']):>12s}   peak {size(r[name]['peak_bytes'])}"
      )
  verdict = "fits" if r["fits"] else "does not fit"
  lines.append(f"  {verdict} in {r['hbm_bytes'] / GIB:.2f} GiB of HBM" + (f": {r['error']}" if "error" in r else ""))
  lines.append(
    f"estimated decode: {r['tokens_per_s']:,.0f} tokens/s at most (weights and cache read once per step "
    f"at the chip's HBM bandwidth)"
  )
  return "\n".join(lines)


def format_report(r: dict) -> str:
  """The human-readable lines `jaxlm compile` prints for a `compile_train_step` report."""
  mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items())
  head = (
    f"{r['topology']}: {r['chips']} x {r['chip']} chips, mesh {mesh}; {r['dtype']} compute, "
    f"remat {r['remat_policy']}, global batch {r['global_batch_size']} in {r['num_micro_batches']} micro-batches; "
    f"compiled in {r['compile_s']:.1f} s"
  )
  hbm = r["hbm_bytes"] / GIB
  if not r["fits"] and "error" in r:
    return f"{head}\ndoes not fit in {hbm:.2f} GiB of HBM per chip: {r['error']}"
  lines = [head, "per chip:"]
  for label, key in (
    ("parameters", "params_bytes"),
    ("optimizer state", "optimizer_bytes"),
    ("batch", "batch_bytes"),
    ("activations and temporaries", "temp_bytes"),
    ("peak (all live at once)", "peak_bytes"),
  ):
    lines.append(f"  {label:30s}{memory_lib.format_bytes(r[key], decimals=2):>12s}")
  verdict = "fits" if r["fits"] else "does not fit"
  lines.append(f"  {verdict} in {hbm:.2f} GiB of HBM ({100 * r['peak_bytes'] / r['hbm_bytes']:.1f}% used)")
  lines.append(
    f"estimated step {r['step_s'] * 1e3:.1f} ms ({r['bound']}-bound: compute {r['compute_s'] * 1e3:.1f} ms, "
    f"HBM {r['memory_s'] * 1e3:.1f} ms, network {r['network_s'] * 1e3:.1f} ms), "
    f"MFU <= {100 * r['mfu']:.0f}%, {r['tokens_per_s']:,.0f} tokens/s "
    f"(a roofline upper bound; see jaxlm/training/aot.py)"
  )
  return "\n".join(lines)
