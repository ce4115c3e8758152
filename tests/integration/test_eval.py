"""`jaxlm eval` on the session's CLI run: it says how many batches and tokens it scores and shows progress, agrees
with training's validation on the same batches, compresses the same bytes it scores, and prints tables as text."""

import argparse
import contextlib
import io
import json
import re
import subprocess

import numpy as np
import pytest
from support import run_in_process

from jaxlm import loader
from jaxlm.cli import commands, main
from jaxlm.data import pipeline as data_lib
from jaxlm.families import decoder
from jaxlm.tasks import evaluate


def report(result) -> dict:
  """The JSON that `jaxlm eval` prints before its summary line."""
  return json.loads(result.stdout[: result.stdout.rindex("}") + 1])


@pytest.fixture(scope="module")
def evaluated(cli_run) -> subprocess.CompletedProcess:
  """`jaxlm eval --max-batches 1` on the CLI run (trained with train.eval_batches=1), in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main.main(["eval", "--workdir", str(cli_run[0]), "--max-batches", "1"])
  assert status == 0, err.getvalue()[-3000:]
  return subprocess.CompletedProcess([], status, out.getvalue(), err.getvalue())


def test_eval_says_its_batches_and_shows_progress(evaluated):
  assert "eval: scoring the first 1 of " in evaluated.stderr and "validation batches of 8 rows" in evaluated.stderr
  assert "eval: batch 1/1 (" in evaluated.stderr
  assert report(evaluated)["batches"] == 1


def test_eval_and_training_validation_agree_on_the_same_batches(cli_run, evaluated):
  workdir, train_stderr = cli_run
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val_loss = [row["val_loss"] for row in logged if "val_loss" in row][-1]
  result = report(evaluated)
  assert result["loss"] == pytest.approx(val_loss, rel=1e-5)
  line = re.search(r"step 6: validation loss [\d.]+ on 1 batch, ([\d,]+) tokens", train_stderr)
  assert line and int(line.group(1).replace(",", "")) == result["tokens"]
  summary = evaluated.stdout.splitlines()[-1]
  assert f"on 1 batch, {result['tokens']:,.0f} tokens (the batches training's validation scores)" in summary


def test_eval_baselines_compress_the_bytes_it_scored(cli_run, evaluated):
  run = loader.load(cli_run[0])
  rows = data_lib.decoder_rows(run.config, run.tokenizer, "validation")
  tokens = rows.stream.tokens[1 : 8 * rows.seq_len + 1]  # the targets of the one batch of 8 rows
  scored = bytes(int(t) - run.tokenizer.offset for t in tokens if t >= run.tokenizer.offset)
  result = report(evaluated)
  assert result["baseline_bytes"] == len(scored) < rows.stream.num_bytes
  expected = decoder.compression_bits_per_byte(scored)
  assert result["gzip-9_bits_per_byte"] == pytest.approx(expected["gzip-9"])
  assert result["xz-9_bits_per_byte"] == pytest.approx(expected["xz-9"])
  assert "on the same 2" in evaluated.stdout.splitlines()[-1]  # "... on the same 2,0xx bytes)"


def test_eval_prints_a_table_once_as_text(monkeypatch, capsys):
  table = "class    precision\nalpha    0.500\nbeta     1.000"
  fake = {"step": 3, "accuracy": 0.5, "summary": "step 3: accuracy 0.500", "per_class_table": table}
  monkeypatch.setattr(evaluate, "evaluate", lambda workdir, step, max_batches: fake)
  args = argparse.Namespace(command="eval", workdir="run", step=None, max_batches=None, tasks="")
  assert commands.run(args, []) == 0
  out = capsys.readouterr().out
  assert out.count("alpha    0.500") == 1 and "\\n" not in out  # once, as lines, not an escaped string
  assert json.loads(out[: out.rindex("}") + 1]) == {"step": 3, "accuracy": 0.5}
  assert out.rstrip().endswith(table) and "step 3: accuracy 0.500" in out


def test_eval_of_other_batches_says_how_to_match_training(cli_run, capfd):
  result = run_in_process(["eval", "--workdir", str(cli_run[0]), "--max-batches", "2"], capfd)
  assert result.returncode == 0, result.stderr[-3000:]
  numbers = report(result)
  assert numbers["batches"] == 2 and "eval: batch 2/2" in result.stderr
  summary = result.stdout.splitlines()[-1]
  assert "training's validation scores the first 1 (train.eval_batches): --max-batches 1 gives its loss" in summary
  assert np.isfinite(numbers["loss"])
