"""`train.profile_steps`: a jax.profiler trace of a few training steps, for TensorBoard's profiler or Perfetto.

`--config.train.profile_steps=5:8` traces steps 5 to 8 (as the log lines number them) into
RUN/profile/HOST/plugins/profile/TIMESTAMP/ (HOST.xplane.pb and, for Perfetto, HOST.trace.json.gz):
`tensorboard --logdir RUN/profile` shows it under Profile, or open the trace.json.gz at ui.perfetto.dev. The
trace starts before the first step is dispatched and stops once the last one has finished on the device, so it
holds whole steps. A gs:// run traces into a local folder and copies the files up when the trace stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

import jax

from jaxlm import config as config_lib
from jaxlm.storage import fs


def parse_steps(text: str) -> tuple[int, int] | None:
  """(first, last) step of `train.profile_steps` ('5:8', or '5' for one step); None when empty.

  Raises:
    ConfigError: the text is not FIRST:LAST with 1 <= FIRST <= LAST.
  """
  if not text.strip():
    return None
  first, _, last = text.partition(":")
  try:
    steps = int(first), int(last or first)
  except ValueError:
    steps = (0, 0)
  if not 1 <= steps[0] <= steps[1]:
    raise config_lib.ConfigError(
      f"config key 'train.profile_steps' is '{text}'; write FIRST:LAST steps with 1 <= FIRST <= LAST, e.g. 5:8 "
      "(or '' for no trace)"
    )
  return steps


class StepProfiler:
  """Starts a jax.profiler trace before step `first` and stops it after step `last` of `train.profile_steps`.

  Args:
    profile_steps: the config's `train.profile_steps` text.
    workdir: the run's work directory; the trace goes to workdir/profile/HOST.
    log: prints one line (where the trace went).
  """

  def __init__(self, profile_steps: str, workdir, log):
    self.steps = parse_steps(profile_steps)
    self.logdir = fs.join(workdir, "profile")
    self.destination = fs.join(self.logdir, socket.gethostname())
    self.log = log
    self.tracing_into: str | None = None

  def before_step(self, step: int) -> float:
    """Call before dispatching step `step` (numbered from 1); returns the seconds spent starting a trace, which
    the trainer leaves out of the step time."""
    if self.steps is None or step != self.steps[0] or self.tracing_into is not None:
      return 0.0
    start = time.perf_counter()
    local = not fs.is_url(self.destination)
    self.tracing_into = self.destination if local else tempfile.mkdtemp(prefix="jaxlm-profile-")
    jax.profiler.start_trace(self.tracing_into, create_perfetto_trace=True)
    return time.perf_counter() - start

  def after_step(self, step: int, outputs) -> float:
    """Call after dispatching step `step`, with what it returned: at the last traced step, waits for `outputs`
    on the device and stops the trace. Returns the seconds spent writing the trace (0 otherwise)."""
    if self.tracing_into is None or step < self.steps[1]:
      return 0.0
    jax.block_until_ready(outputs)  # the step's own time stays in the step time
    start = time.perf_counter()
    self.stop(outputs)
    return time.perf_counter() - start

  def stop(self, outputs=None) -> None:
    """Stops a running trace (after `outputs` are ready), copying it to a bucket if the run is in one."""
    if self.tracing_into is None:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    if self.tracing_into != self.destination:
      for folder, _, names in os.walk(self.tracing_into):
        for name in names:
          relative = os.path.relpath(os.path.join(folder, name), self.tracing_into)
          with open(os.path.join(folder, name), "rb") as f:
            fs.write_bytes(fs.join(self.destination, relative), f.read())
      shutil.rmtree(self.tracing_into, ignore_errors=True)
    self.tracing_into = None
    self.log(
      f"profiled steps {self.steps[0]}-{self.steps[1]} into {self.destination}: tensorboard --logdir "
      f"{self.logdir} (Profile), or its *.trace.json.gz at ui.perfetto.dev"
    )
