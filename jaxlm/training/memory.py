"""Does the train step fit a device? XLA's memory analysis of the compiled step against the device's memory.

The trainer runs two checks before any state exists, cheapest first:
1. `sharding.check_state_fits` counts the train state from its shapes: no tracing, milliseconds. It is a
   lower bound naming the model's sizes, so an absurd model (model.max_len=1e9) is refused before a trace
   and compile that could take minutes.
2. `compile_train_step_that_fits` compiles the real step ahead of time (lower, compile, read
   `memory_analysis()`, as MaxText's train_compile.py does; nothing runs and nothing is allocated) and
   compares the peak of one device's program, activations and other temporaries included, with the
   device's memory. Training runs that executable, so the step still compiles once.

Where a backend has no memory analysis, the first check is all there is. `jaxlm compile`
(`jaxlm.training.aot`) reports the same `StepMemory.peak` against a TPU chip's memory, so the two agree on
whether a step fits.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax

from jaxlm import config as config_lib
from jaxlm.parallel import sharding
from jaxlm.training.chips import GIB

if TYPE_CHECKING:
  from jaxlm.training import step as train_step


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes one device needs for a compiled step, from XLA's `memory_analysis()`.

  arguments: the inputs (train state and batch); outputs: the results; aliased: the outputs written into
  donated inputs (counted once, as arguments); temporaries: what lives only during the step (activations,
  gradients, optimizer scratch); code: the generated code.
  """

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def peak(self) -> int:
    """Everything live at once: an upper estimate, as some temporaries are freed before the outputs are written."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def step_memory(compiled: jax.stages.Compiled) -> StepMemory | None:
  """XLA's memory analysis of `compiled` as a `StepMemory`, or None where the backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return StepMemory(
    arguments=analysis.argument_size_in_bytes,
    outputs=analysis.output_size_in_bytes,
    aliased=analysis.alias_size_in_bytes,
    temporaries=analysis.temp_size_in_bytes,
    code=analysis.generated_code_size_in_bytes,
  )


def check_step_fits(memory: StepMemory, state: int, config, device: jax.Device | None = None) -> None:
  """Raises ConfigError, in one line, when a step needing `memory` cannot fit `device`.

  state: the bytes of its train state on one device (part of `memory.arguments`; the rest is the batch).
  config: the whole config, for the keys the fix names. device: what to compare with (default this
  process's first device; see `sharding.available_bytes`). The line names the estimate, the limit, the
  parts largest first, and the config keys that shrink the largest part.
  """
  available, source = sharding.available_bytes(device or jax.local_devices()[0])
  if memory.peak <= available:
    return
  parts = {
    "temporaries (activations, gradients)": memory.temporaries,
    "train state": state,
    "batch": max(memory.arguments - state, 0),
    "outputs not written in place": memory.outputs - memory.aliased,
    "code": memory.code,
  }
  # Largest first; parts too small to show (the metrics among the outputs) are left out.
  listed = ", ".join(
    f"{name} {format_bytes(size)}"
    for name, size in sorted(parts.items(), key=lambda p: -p[1])
    if format_bytes(size) != format_bytes(0)
  )
  fix = (
    _activation_fix(config)
    if memory.temporaries >= state
    else "shard the state with --config.mesh.fsdp=N, or lower model.d_model, model.num_layers or model.vocab_size"
  )
  raise config_lib.ConfigError(
    f"the train step needs about {format_bytes(memory.peak)} per device by XLA's memory analysis ({listed}) but the "
    f"{source} is {format_bytes(available)}, {memory.peak / available:.1f}x less; {fix}"
  )


def compile_train_step_that_fits(s: train_step.Setup) -> train_step.CompiledStep:
  """`train_step.compile_train_step(s)`, after `check_step_fits` on its memory analysis.

  Returns the compiled step for the trainer to run. Raises ConfigError when it cannot fit, and when XLA
  itself refuses to compile it for lack of memory (TPU compilers do).
  """
  from jaxlm.training import step as train_step  # local: `jaxlm compile` reads this module before the model stack

  try:
    step = train_step.compile_train_step(s)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise config_lib.ConfigError(
      f"XLA could not fit the train step on a device ({xla_oom_line(str(e))}); {_activation_fix(s.config)}; "
      "for a large state, shard it with --config.mesh.fsdp=N"
    ) from None
  memory = step_memory(step.compiled)
  if memory is not None:
    check_step_fits(memory, sharding.shard_bytes(s.abstract_state, s.state_shardings), s.config)
  return step


def _activation_fix(config) -> str:
  """What shrinks the step's temporaries, by the keys of the whole `config`."""
  remat = "" if config.model.get("remat_policy") == "full" else ", set model.remat_policy=full"
  return (
    "lower train.global_batch_size or data.seq_len, raise train.num_micro_batches"
    + remat
    + ", or spread the batch over more devices (mesh.data, mesh.fsdp)"
  )


def xla_oom_line(message: str) -> str:
  """The line of an XLA error that says what ran out.

  Args:
    message: the text of XLA's RESOURCE_EXHAUSTED error, which runs to many lines.

  Returns:
    Its first line naming RESOURCE_EXHAUSTED, else its first line.
  """
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  return next((line for line in lines if "RESOURCE_EXHAUSTED" in line), lines[0] if lines else message)


def format_bytes(num_bytes: float, decimals: int = 1) -> str:
  """A size in GiB, or in MiB below a tenth of a GiB.

  Args:
    num_bytes: the size.
    decimals: digits after the point (`jaxlm compile`'s report shows 2, the trainer's refusal 1).

  Returns:
    e.g. '31.0 GiB' or '12.5 MiB'.
  """
  if num_bytes >= GIB / 10:
    return f"{num_bytes / GIB:.{decimals}f} GiB"
  return f"{num_bytes / 2**20:.{decimals}f} MiB"
