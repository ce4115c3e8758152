"""Where a run's metrics and traces go besides metrics.jsonl: a Weights & Biases run (offline) with the config,
each logged step's metrics and the summary; a jax.profiler trace of `train.profile_steps`; and one line when
wandb is missing or the step range is malformed."""

import glob
import json
import socket
import struct
import subprocess
import sys

import pytest
from support import REPO, error_line, run_in_process, tensorboard_scalars, train_args

from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.training import profiling, tracking


def wandb_records(path: str):
  """The records of a W&B run file (run-ID.wandb): a 7-byte header, then LevelDB-log blocks of 32 KiB whose
  chunks (7-byte header: CRC, length, type) carry serialized `Record` protobufs (wandb has no Python reader)."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  position, block, payload = 7, 32768, b""
  while position + 7 <= len(data):
    left = block - position % block
    _, length, kind = struct.unpack("<IHB", data[position : position + 7]) if left >= 7 else (0, 0, 0)
    if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
      position += left
      continue
    payload += data[position + 7 : position + 7 + length]
    position += 7 + length
    if kind in (1, 4):  # FULL or LAST: a whole record
      record = wandb_internal_pb2.Record()
      record.ParseFromString(payload)
      yield record
      payload = b""


def key(item) -> str:
  return item.key or ".".join(item.nested_key)


@pytest.fixture(scope="module")
def tracked_run(text_corpus, tmp_path_factory):
  """An 8-step `jaxlm train` in this process, logged every 4 steps to W&B offline, tracing steps 3-5;
  returns (workdir, the W&B run file)."""
  pytest.importorskip("wandb")
  folder = tmp_path_factory.mktemp("tracked")
  workdir = folder / "run"
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(folder))
    patch.setenv("WANDB_SILENT", "true")
    args = train_args(
      text_corpus,
      workdir,
      "--config.train.num_steps=8",
      "--config.train.checkpoint_every=8",
      "--config.train.eval_every=8",
      "--config.train.log_every=4",
      "--config.train.wandb=jaxlm-tests",
      "--config.train.profile_steps=3:5",
    )
    assert main.main(args) == 0
  (run_file,) = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
  return workdir, run_file


def test_wandb_gets_the_config_each_logged_step_and_the_summary(tracked_run):
  workdir, run_file = tracked_run
  records = list(wandb_records(run_file))
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert run.project == "jaxlm-tests" and run.display_name == "run" and run.run_id == tracking.wandb_run_id(workdir)
  config = {key(item): json.loads(item.value_json) for item in run.config.update}
  assert config["train"]["num_steps"] == 8 and config["train"]["wandb"] == "jaxlm-tests"
  history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.history.item]
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # Every metrics.jsonl row (steps 1, 4, 8 and the validation at 8) is in W&B at its step, same values.
  by_step = {}
  for row in history:
    by_step.setdefault(row["_step"], {}).update(row)
  assert sorted(by_step) == [1, 4, 8]
  for row in logged:
    for name, value in row.items():
      assert by_step[row["step"]][name if name != "step" else "_step"] == pytest.approx(value), (row["step"], name)
  summary = {}
  for r in records:
    summary.update({key(i): json.loads(i.value_json) for i in r.summary.update})
  on_disk = json.loads((workdir / "train_summary.json").read_text())
  assert summary["stop_reason"] == "finished" and summary["step"] == 8
  assert summary["tokens_trained"] == on_disk["tokens_trained"] == 8 * 8 * 32


def test_profile_steps_writes_a_trace_under_the_host_folder(tracked_run):
  workdir, _ = tracked_run
  host = workdir / "profile" / socket.gethostname()
  traces = [*host.rglob("*.xplane.pb"), *host.rglob("*.trace.json.gz")]
  assert traces and all(trace.stat().st_size > 0 for trace in traces), list(host.rglob("*"))


def test_malformed_profile_steps_and_a_missing_wandb_are_one_line(text_corpus, tmp_path, monkeypatch, capfd):
  for text in ("8:5", "five", "0:2"):
    with pytest.raises(config_lib.ConfigError, match="train.profile_steps"):
      profiling.parse_steps(text)
  assert profiling.parse_steps("") is None and profiling.parse_steps("5") == (5, 5)
  result = run_in_process(train_args(text_corpus, tmp_path / "a", "--config.train.profile_steps=8:5"), capfd)
  assert result.returncode == 2 and "'train.profile_steps' is '8:5'" in error_line(result)
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: its import fails
  result = run_in_process(train_args(text_corpus, tmp_path / "b", "--config.train.wandb=p"), capfd)
  assert result.returncode == 2 and "pip install -e '.[wandb]'" in error_line(result)


def test_the_tensorboard_writer_leaves_torch_unimported_and_importable(tmp_path):
  # tensorboardX imports torch whenever it is installed (torch is, with the test extras): a run's start would pay
  # for it. The writer hides torch while tensorboardX loads; torch still imports afterwards.
  script = f"""
import glob, sys
from jaxlm.storage import fs
writer = fs.tensorboard_writer({str(tmp_path)!r})
writer.add_scalar("loss", 0.5, 7)
writer.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch
print(glob.glob({str(tmp_path / "*tfevents*")!r})[0])
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  events = open(result.stdout.strip(), "rb").read()
  assert tensorboard_scalars(events) == {"loss": [(7, 0.5)]}
