"""Training progress on stderr: a smoothed time-left estimate, and a bar only on a terminal.

The bar counts finished steps and shows the latest finished step's loss: the trainer reports a step once
its result has been read back from the device (at most two steps after it was dispatched,
`jaxlm.training.trainer.RUN_AHEAD_STEPS`), never when it was only queued.

The estimate leaves the first step out (it waits for compilation) and smooths
the step time with an exponential moving average over log intervals, so one
slow interval moves it a little. Time between the steps (validation,
checkpoints, the MFU peak measurement) is spread over the steps run so far
and added to each step left. On a terminal a tqdm bar shows it; anywhere else
(a pipe, a log file, a scheduler) there is no bar, only the trainer's plain
line per log interval, which carries the estimate.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

import tqdm


def format_seconds(seconds: float | None) -> str:
  """'1:02:03', '2:03' or '?' (unknown yet)."""
  if seconds is None:
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class EtaEstimator:
  """Seconds left in a run of `total_steps`.

  smoothing: the weight of the newest interval's step time in the moving average.
  clock: a time source in seconds (tests pass their own).
  """

  def __init__(self, total_steps: int, smoothing: float = 0.3, clock: Callable[[], float] = time.perf_counter):
    self.total_steps, self.smoothing, self.clock = total_steps, smoothing, clock
    self.step_seconds: float | None = None  # the moving average of one step's time
    self.started_at: float | None = None
    self.first_step = 0
    self.seconds_in_steps = 0.0
    self.overhead_per_step = 0.0

  def start(self, done: int) -> None:
    """Call when step `done` (the compiling one) has finished: the clock for the rest starts here."""
    self.started_at, self.first_step = self.clock(), done

  def observe(self, done: int, steps: int, seconds: float) -> None:
    """`steps` steps took `seconds` (step time only), ending at step `done`; call at each log interval."""
    if steps <= 0:
      return
    per_step = seconds / steps
    self.step_seconds = (
      per_step if self.step_seconds is None else (self.smoothing * per_step + (1 - self.smoothing) * self.step_seconds)
    )
    self.seconds_in_steps += seconds
    if self.started_at is not None and done > self.first_step:
      elapsed = self.clock() - self.started_at
      self.overhead_per_step = max(elapsed - self.seconds_in_steps, 0.0) / (done - self.first_step)

  def seconds_left(self, done: int) -> float | None:
    """Seconds until `total_steps` after step `done`; None until an interval after the first step is observed."""
    if self.step_seconds is None:
      return None
    return (self.total_steps - done) * (self.step_seconds + self.overhead_per_step)


class Progress:
  """A tqdm bar with the `EtaEstimator`'s time left when `stream` is a terminal (and `enabled`); else nothing.

  Args:
    start: the first step of this run (resumed runs start later).
    total: the last step.
    enabled: False draws no bar even on a terminal.
    stream: where the bar goes; None: `sys.stderr` as it is when the bar is made (not when this module was
      imported, which may have been under another stream, e.g. a test's captured one).
  """

  def __init__(self, start: int, total: int, enabled: bool = True, stream: TextIO | None = None):
    stream = sys.stderr if stream is None else stream
    self.eta = EtaEstimator(total)
    self.total = total
    on_terminal = enabled and hasattr(stream, "isatty") and stream.isatty()
    # tqdm's own rate counts the compile step and validation pauses; the bar shows our estimate instead.
    self.bar = (
      tqdm.tqdm(
        total=total,
        initial=start,
        file=stream,
        dynamic_ncols=True,
        desc="train",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
      )
      if on_terminal
      else None
    )
    self.loss = ""

  def update(self, done: int, loss: float | None = None) -> None:
    """Step `done` finished on the device (with its `loss`, when known): moves the bar."""
    if self.bar is None:
      return
    if loss is not None:
      self.loss = f"loss {loss:.3f}, "
    self.bar.update(done - self.bar.n)
    self.bar.set_postfix_str(f"{self.loss}{format_seconds(self.eta.seconds_left(done))} left", refresh=False)

  def line_suffix(self, done: int) -> str:
    """'step/total, time left' for the plain log line of step `done`."""
    return f"{done}/{self.total}, {format_seconds(self.eta.seconds_left(done))} left"

  def close(self) -> None:
    """Closes the bar, if any."""
    if self.bar is not None:
      self.bar.close()
