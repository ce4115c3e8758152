"""What training prints while it runs: the time-left estimate, the bar on a terminal only, plain lines in a
pipe; and that `jaxlm eval` on the run prints no absl/orbax warnings."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from support import run_cli, xla_flags

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
    assert re.search(r"mfu [\d.]+% of [\d.,]+ GFLOP/s nominal \(\d/6, \d+:\d\d left\)$", line), line
  assert "MFU is relative to the nominal peak of 1 x " in stderr and "cached in" in stderr  # the banner says which peak


def test_eval_prints_no_absl_or_orbax_warnings(cli_run):
  workdir, _ = cli_run
  result = run_cli(["eval", "--workdir", str(workdir), "--max-batches", "1"], devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or re.match(r"W\d{4} ", line)]
  assert not warnings, warnings


class RecordingProgress(progress.Progress):
  """A Progress that records each update (step, loss) the trainer makes."""

  updates: list = []

  def update(self, done, loss=None):
    RecordingProgress.updates.append((done, loss))
    super().update(done, loss)


def test_the_bar_counts_finished_steps_with_their_own_loss(text_corpus, tmp_path, monkeypatch):
  from support import files_config

  import jaxlm

  monkeypatch.setattr(progress, "Progress", RecordingProgress)
  RecordingProgress.updates = []
  config = files_config(text_corpus)
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = 8, 1000, 1000
  texts = [path.read_text() for path in sorted(text_corpus.glob("*.txt"))]
  jaxlm.train(config, tmp_path, train_data=texts)  # no validation: steps only
  steps = [step for step, _ in RecordingProgress.updates]
  # Step 1 (logged), 2-6 as each finishes (read two dispatches later), 8 (logged, with 7 finished before it).
  assert steps == [1, 2, 3, 4, 5, 6, 8], steps
  losses = [loss for _, loss in RecordingProgress.updates]
  assert all(loss is not None for loss in losses)  # never a bar without the latest finished loss
  assert len(set(losses)) == len(losses)  # each step's own loss, not step 1's held until the next log line
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {row["step"]: row["loss"] for row in logged if "loss" in row} == {1: losses[0], 8: losses[-1]}


def test_sigint_saves_and_exits_within_a_few_steps(text_corpus, tmp_path):
  from support import REPO, train_args

  # Steps long enough (a wider model) that running ahead of the device would show in the time to exit.
  args = train_args(
    text_corpus,
    tmp_path,
    "--config.train.num_steps=100000",
    "--config.train.log_every=5",
    "--config.train.checkpoint_every=100000",
    "--config.train.eval_every=100000",
    "--config.model.d_model=128",
    "--config.model.mlp_dim=512",
    "--config.data.seq_len=64",
    "--config.train.global_batch_size=32",
  )
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  process = subprocess.Popen(
    [sys.executable, "-m", "jaxlm", *args], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
  )
  try:
    seen = []
    for line in process.stderr:
      seen.append(line)
      if line.startswith("step 10:"):
        break
    signalled_at = time.perf_counter()
    process.send_signal(signal.SIGINT)
    stderr = "".join(seen) + process.communicate(timeout=120)[1]
    exit_seconds = time.perf_counter() - signalled_at
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-3000:]
  stopped = re.findall(r"stopped at step (\d+); resume", stderr)
  assert len(stopped) == 1 and int(stopped[0]) <= 10 + 3, stderr[-3000:]  # dispatched at most 2 steps ahead
  summary = json.loads((tmp_path / "train_summary.json").read_text())
  assert summary["stop_reason"] == "sigint" and summary["step"] == int(stopped[0])
  assert (tmp_path / "checkpoints" / stopped[0]).is_dir()
  # The exit takes the steps still running (at most 3), the save, and the process's own teardown: bounded by
  # the step time and the measured save, not by how far the host had run ahead.
  step_time = max(json.loads(line).get("step_time_s", 0) for line in (tmp_path / "metrics.jsonl").open())
  assert exit_seconds < 5 * step_time + 2 * summary["checkpoint_time_s"] + 15, (exit_seconds, step_time, summary)
