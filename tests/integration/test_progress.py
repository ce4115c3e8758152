"""What training prints while it runs: the time-left estimate, the bar on a terminal only, plain lines in a
pipe; and that `jaxlm eval` on the run prints no absl/orbax warnings."""

import io
import re

import pytest
from support import run_cli

from jaxlm.training import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_eta_leaves_out_the_compile_step_and_smooths():
  clock = FakeClock()
  eta = progress.EtaEstimator(total_steps=101, smoothing=0.3, clock=clock)
  clock.now = 100.0  # step 1 waited 100 s for compilation
  eta.start(done=1)
  assert eta.seconds_left(1) is None  # nothing measured yet: '?', not 100 s x 100 steps
  for done in range(11, 61, 10):  # 10 steps of 1 s each, logged every 10 steps
    clock.now += 10.0
    eta.observe(done, 10, 10.0)
  assert eta.seconds_left(51) == pytest.approx(50.0)  # 50 steps left at 1 s; the compile step is not in it
  clock.now += 30.0  # one interval three times as slow (a neighbour's job)
  eta.observe(61, 10, 30.0)
  # The average moves by the smoothing weight: 0.3 * 3 + 0.7 * 1 = 1.6 s per step, not 3.
  assert eta.seconds_left(61) == pytest.approx(40 * 1.6)


def test_eta_spreads_validation_time_over_the_steps():
  clock = FakeClock()
  eta = progress.EtaEstimator(total_steps=41, smoothing=0.5, clock=clock)
  eta.start(done=1)
  clock.now += 10.0
  eta.observe(11, 10, 10.0)
  clock.now += 20.0  # a 10 s validation, then 10 steps of 1 s
  eta.observe(21, 10, 10.0)
  # 1 s per step plus 10 s of validation over the 20 steps run: 1.5 s for each of the 20 left.
  assert eta.seconds_left(21) == pytest.approx(30.0)


def test_format_seconds():
  assert progress.format_seconds(None) == "?"
  assert progress.format_seconds(59.6) == "1:00"
  assert progress.format_seconds(3723) == "1:02:03"


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_bar_only_on_a_terminal():
  piped = io.StringIO()
  plain = progress.Progress(0, 10, stream=piped)
  plain.update(1, 2.5)
  plain.close()
  assert plain.bar is None and piped.getvalue() == ""
  terminal = Terminal()
  bar = progress.Progress(0, 10, stream=terminal)
  bar.update(3, 2.5)
  bar.bar.refresh()
  bar.close()
  assert "\r" in terminal.getvalue() and "loss 2.500" in terminal.getvalue() and "3/10" in terminal.getvalue()


def test_piped_training_prints_plain_lines(cli_run):
  _, stderr = cli_run  # 6 steps, logged every 2
  assert "\r" not in stderr  # no carriage-return bar updates in a pipe
  step_lines = [line for line in stderr.splitlines() if re.match(r"step \d+: grad_norm", line)]
  # One line per log interval (steps 2, 4, 6), plus the first step's (its time is compilation).
  assert [int(line.split()[1].rstrip(":")) for line in step_lines] == [1, 2, 4, 6]
  assert step_lines[0].endswith("(1/6, ? left)")  # no rate from the compile step alone
  for line in step_lines[1:]:
    assert re.search(r"mfu [\d.]+% of [\d.,]+ GFLOP/s measured \(\d/6, \d+:\d\d left\)$", line), line
  assert "MFU is relative to the fastest float32 matmul" in stderr  # the banner says which peak


def test_eval_prints_no_absl_or_orbax_warnings(cli_run):
  workdir, _ = cli_run
  result = run_cli(["eval", "--workdir", str(workdir), "--max-batches", "1"], devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or re.match(r"W\d{4} ", line)]
  assert not warnings, warnings
