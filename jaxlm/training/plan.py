"""`jaxlm compile --plan`: the fastest mesh layout x remat policy x micro-batches that fits a TPU slice.

A full AOT compile of a GPT-2-small step takes minutes on a small machine, so the planner compiles as
few candidates as it can:
1. Every candidate gets an analytic estimate first: the train state per chip exactly (its shapes and
   shardings, `sharding.shard_bytes`), the temporaries from a formula (`estimate_temporaries`: the
   activations the remat policy saves per layer, one layer's working set, the logits, the float32
   gradients), both summed as a `memory.StepMemory`, whose `peak` is the sum `jaxlm train` checks; and
   the roofline step time of `aot.estimate`.
2. Candidates go in order of estimated step time (then fewer micro-batches, then smaller peak); those whose
   estimated peak exceeds the chip's HBM are pruned without a compile.
3. The first candidates left are compiled for real (`aot.compile_train_step`) until one fits. Each
   compile, fitting or refused by XLA for memory, scales the formula for that remat policy by what XLA
   measured, so the order and the pruning of the rest use the corrected figure.
The plan picked is always one XLA compiled and fitted: a full compile confirms it.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import aot
from jaxlm.training import memory as memory_lib
from jaxlm.training.chips import CHIPS, GIB

REMAT_POLICIES = ("none", "dots", "dots_no_batch", "full")


@dataclasses.dataclass
class Candidate:
  """One plan: mesh sizes, remat policy, micro-batches; its estimate and, once compiled, XLA's report."""

  mesh: dict
  remat: str
  micro: int
  state_bytes: int
  estimated: memory_lib.StepMemory | None = None
  roofline: dict | None = None
  report: dict | None = None
  result: str = "not tried"
  estimated_peak: float | None = None

  def overrides(self) -> list[str]:
    """The --config overrides that select this plan; fsdp takes the devices left (-1), so the config stays
    valid on other device counts."""
    return [
      f"--config.mesh.data={self.mesh['data']}",
      "--config.mesh.fsdp=-1",
      f"--config.mesh.tensor={self.mesh['tensor']}",
      f"--config.model.remat_policy={self.remat}",
      f"--config.train.num_micro_batches={self.micro}",
    ]

  def apply(self, config):
    """A copy of the whole `config` with this plan's keys set."""
    return config_lib.apply_overrides(config, self.overrides())


def _powers_of_two_dividing(n: int) -> list[int]:
  return [2**k for k in range(n.bit_length()) if n % 2**k == 0]


def mesh_layouts(config, num_chips: int) -> list[dict]:
  """data x fsdp x tensor layouts of `num_chips` worth trying: tensor 1, 2, 4 or 8 where the heads and MLP
  divide (the vocabulary too, under the default rules), data a power of two, fsdp the rest; the batch rows
  must split over data x fsdp."""
  m = config.model
  rules = dict(config_lib.mesh_rules(config))
  layouts = []
  for tensor in (1, 2, 4, 8):
    sizes = [m.num_heads, config_lib.num_kv_heads(m), m.mlp_dim] + ([m.vocab_size] if rules.get("vocab") else [])
    if num_chips % tensor or any(size % tensor for size in sizes):
      continue
    for data in _powers_of_two_dividing(num_chips // tensor):
      fsdp = num_chips // tensor // data
      if config.train.global_batch_size % (data * fsdp) == 0:
        layouts.append({"data": data, "fsdp": fsdp, "expert": 1, "tensor": tensor})
  return layouts


def estimate_temporaries(config, mesh: dict, remat: str, micro: int, param_bytes: int) -> int:
  """Bytes of temporaries per chip by formula (rough; the planner scales it by what XLA measures).

  Tokens per chip per micro-batch T; compute-dtype bytes b; widths split over tensor. Saved per layer: `full`
  the layer's input (T d); `dots_no_batch` the weight matmuls' outputs; `dots` those and the attention
  scores; `none` everything the backward reads. Plus one layer's working set (recomputed or not), the
  float32 logits and their gradient, and float32 gradients (twice with micro-batches: the running sum).
  """
  m = config.model
  b = jnp.dtype(m.dtype).itemsize
  t = mesh["tensor"]
  # A family that reads (source, target) pairs runs its decoder over target_len more tokens (0: seq_len).
  target = config.data.target_len or config.data.seq_len
  seq = config.data.seq_len + (target if families.get(m.family).reads_pairs else 0)
  tokens = config.train.global_batch_size // (micro * mesh["data"] * mesh["fsdp"]) * seq
  head_dim = config_lib.head_dim(m)
  q = m.num_heads * head_dim / t
  kv = config_lib.num_kv_heads(m) * head_dim / t
  f = m.mlp_dim * (2 if m.mlp == "swiglu" else 1) / t
  scores = m.num_heads / t * config.data.seq_len * (b + 4)  # per token: float32 scores and compute-dtype probs
  matmuls = tokens * b * (2 * m.d_model + q + 2 * kv + m.d_model + f + m.mlp_dim / t)
  layer = matmuls + tokens * b * 4 * m.d_model + tokens * scores
  saved = {"full": tokens * b * m.d_model, "dots_no_batch": matmuls, "dots": matmuls + tokens * scores}.get(
    remat, layer
  )
  layers = sum(families.get(m.family).attention_layers(m))
  logits = tokens * m.vocab_size / t * (4 + 4 + b)
  gradients = param_bytes * (2 if micro > 1 else 1)
  return int(layers * saved + layer + logits + gradients)


def candidates(config, topology: str, devices: list) -> list[Candidate]:
  """Every layout x remat policy x micro-batch count for the slice, each with its estimates (no compile)."""
  from jaxlm.training import step as train_step  # local: the model stack loads only when compiling

  kind, _, num_chips = aot.parse_topology(topology)
  chip = CHIPS[kind]
  found = []
  for layout in mesh_layouts(config, num_chips):
    plan = Candidate(layout, "full", 1, 0)
    trial = plan.apply(config)
    s = train_step.setup(trial, mesh_lib.make_mesh(trial, devices, torus=True))
    try:
      aot.check_divisible(s.abstract_state, s.state_shardings)
    except aot.CompileError:
      continue  # a weight the layout cannot split evenly
    state = sharding.shard_bytes(s.abstract_state, s.state_shardings)
    params = sharding.shard_bytes(s.abstract_state.params, s.state_shardings.params)
    rows = config.train.global_batch_size // (layout["data"] * layout["fsdp"])
    for remat in REMAT_POLICIES:
      for micro in _powers_of_two_dividing(rows):
        plan = Candidate(layout, remat, micro, state)
        temporaries = estimate_temporaries(config, layout, remat, micro, params)
        plan.estimated = memory_lib.StepMemory(
          arguments=state, outputs=state, aliased=state, temporaries=temporaries, code=0
        )
        plan.roofline = aot.estimate(plan.apply(config), chip, num_chips, layout, params, plan.estimated)
        found.append(plan)
  return found


def _measured_temporaries(report: dict) -> int | None:
  """XLA's temporaries of a compile report: measured when it compiled, else from its RESOURCE_EXHAUSTED line
  ('HLO temporaries (45.80G) exceeds ...')."""
  if "temp_bytes" in report:
    return report["temp_bytes"]
  found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", report.get("error", ""))
  return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024) if found else None


def plan(config, topology: str, max_compiles: int = 4, log=print) -> dict:
  """Searches the plans of `config` (whole config) for `topology`; returns the search as a dict.

  Args:
    config: the whole config; its mesh, remat policy and micro-batches are what the search replaces.
    topology: a slice name `aot.target_slice` accepts.
    max_compiles: compiles at most (each takes minutes for a paper-sized model on a small machine).
    log: where each compile's one-line outcome goes as it finishes.

  Returns:
    {'topology', 'chip', 'chips', 'hbm_bytes', 'candidates': [row, ...] in search order, 'picked': the
    fitting row or None, 'overrides': its --config flags}. A row: mesh, remat_policy, num_micro_batches,
    estimated_peak_bytes, step_s, mfu, result ('fits', 'does not fit', 'pruned', 'not tried'), and for a
    compiled one its `aot.compile_train_step` report.
  """
  kind, devices = aot.tpu_devices(topology)
  hbm = CHIPS[kind].hbm_bytes
  pending = candidates(config, topology, devices)
  if not pending:
    raise aot.CompileError(
      f"--plan: no mesh layout of {len(devices)} chips splits train.global_batch_size="
      f"{config.train.global_batch_size} and the model's weights; make the batch a multiple of {len(devices)}"
    )
  scale = dict.fromkeys(REMAT_POLICIES, 1.0)  # XLA's temporaries over the formula's, per remat policy

  def peak(c: Candidate) -> float:
    return c.estimated.peak + (scale[c.remat] - 1) * c.estimated.temporaries

  done, picked, compiles = [], None, 0
  while pending:
    pending.sort(key=lambda c: (peak(c) > hbm, c.roofline["step_s"], c.micro, peak(c)))
    c = pending.pop(0)
    if peak(c) > hbm:
      c.result = "pruned"
    elif picked is None and compiles < max_compiles:
      compiles += 1
      c.estimated_peak = peak(c)  # the estimate the compile is judged against, before it rescales the formula
      c.report = aot.compile_train_step(c.apply(config), topology)
      c.result = "fits" if c.report["fits"] else "does not fit"
      measured = _measured_temporaries(c.report)
      if measured:
        scale[c.remat] = measured / c.estimated.temporaries
      log(
        f"compiled {_describe(c)}: {c.result}"
        + (f", peak {memory_lib.format_bytes(c.report['peak_bytes'], 2)}" if "peak_bytes" in c.report else "")
        + f" ({c.report['compile_s']:.0f} s)"
      )
      picked = c if c.report["fits"] else None
    done.append(c)
  return {
    "topology": topology,
    "chip": kind,
    "chips": len(devices),
    "hbm_bytes": hbm,
    "compiles": compiles,
    "candidates": [_row(c, c.estimated_peak or peak(c)) for c in done],
    "picked": _row(picked, picked.estimated_peak) if picked else None,
    "overrides": picked.overrides() if picked else [],
  }


def _describe(c: Candidate) -> str:
  mesh = " x ".join(str(c.mesh[axis]) for axis in mesh_lib.AXES)
  return f"mesh {mesh}, remat {c.remat}, {c.micro} micro-batch{'es' if c.micro > 1 else ''}"


def _row(c: Candidate, estimated_peak: float) -> dict:
  row = {
    "mesh": c.mesh,
    "remat_policy": c.remat,
    "num_micro_batches": c.micro,
    "estimated_peak_bytes": int(estimated_peak),
    "step_s": c.roofline["step_s"],
    "mfu": c.roofline["mfu"],
    "result": c.result,
  }
  if c.report:
    row["report"] = c.report
  return row


def format_plan(p: dict, shown: int = 12) -> str:
  """The lines `jaxlm compile --plan` prints: the compiled plans, the best others, the pick and its flags."""
  size = lambda n: memory_lib.format_bytes(n, 2)  # noqa: E731
  rows = p["candidates"]
  counts = {result: sum(r["result"] == result for r in rows) for result in ("fits", "does not fit", "pruned")}
  lines = [
    f"plan for {p['topology']}: {p['chips']} x {p['chip']} chips, {p['hbm_bytes'] / GIB:.2f} GiB of HBM each; "
    f"{len(rows)} plans (mesh data x fsdp x tensor, remat, micro-batches), {counts['pruned']} pruned by the "
    f"memory estimate, {p['compiles']} compiled in order of estimated step time",
    f"  {'mesh':12s}{'remat':15s}{'micro':>6s}{'est. peak':>12s}{'XLA peak':>12s}{'est. step':>12s}{'MFU <=':>8s}  result",
  ]
  compiled = [r for r in rows if "report" in r]
  others = [r for r in rows if "report" not in r and r["result"] != "pruned"][: max(shown - len(compiled), 0)]
  for r in compiled + others:
    mesh = "x".join(str(r["mesh"][axis]) for axis in mesh_lib.AXES)
    xla = size(r["report"]["peak_bytes"]) if "report" in r and "peak_bytes" in r["report"] else "-"
    lines.append(
      f"  {mesh:12s}{r['remat_policy']:15s}{r['num_micro_batches']:>6d}{size(r['estimated_peak_bytes']):>12s}"
      f"{xla:>12s}{r['step_s'] * 1e3:>9.3g} ms{100 * r['mfu']:>7.0f}%  {r['result']}"
    )
  pick = p["picked"]
  if pick is None:
    lines.append(
      f"no plan compiled and fitted in {p['compiles']} compiles; raise --plan-compiles, or use a larger slice"
    )
    return "\n".join(lines)
  report = pick["report"]
  lines.append(
    f"picked: mesh {' x '.join(f'{a} {n}' for a, n in pick['mesh'].items())}, remat {pick['remat_policy']}, "
    f"{pick['num_micro_batches']} micro-batches: peak {size(report['peak_bytes'])} of {size(p['hbm_bytes'])} "
    f"per chip (XLA), estimated step {report['step_s'] * 1e3:.3g} ms, MFU <= {100 * report['mfu']:.0f}% "
    f"(a roofline upper bound)"
  )
  lines.append("use it with: " + " ".join(p["overrides"]))
  return "\n".join(lines)
