"""End-to-end training through the CLI in fresh processes: resume, signals, NaN, distributed."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from support import REPO, files_config, free_port, run_cli, tiny_config, xla_flags

from jaxlm.data import mixture
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.training import step as train_lib
from jaxlm.training import trainer

TINY = str(REPO / "configs" / "tiny.py")


def train_args(text_corpus, workdir, *extra):
  return [
    "train",
    "--config",
    TINY,
    "--workdir",
    str(workdir),
    "--config.data.source=files",
    f"--config.data.paths={text_corpus}/*.txt",
    "--config.data.val_fraction=0.2",
    "--config.train.num_steps=6",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.eval_every=3",
    "--config.train.eval_batches=2",
    "--config.train.keep_checkpoints=5",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    *extra,
  ]


def metrics(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}


def val_losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["val_loss"] for r in rows if "val_loss" in r]


def restore_state(workdir, step, text_corpus):
  cfg = files_config(text_corpus)
  cfg.mesh.data, cfg.mesh.fsdp = 2, 4
  s = train_lib.setup(cfg, mesh_lib.make_mesh(cfg))
  target = checkpoint_lib.abstract_with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
  return jax.device_get(checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True).restore(step, target))


@pytest.fixture(scope="module")
def full_run(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  result = run_cli(train_args(text_corpus, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  (workdir / "cli_stderr.txt").write_text(result.stderr)
  return workdir


def test_banner_before_step_1_and_summary_at_the_end(full_run):
  stderr = (full_run / "cli_stderr.txt").read_text()
  banner, rest = stderr.split("step 1:", 1)
  assert "parameters (" in banner and "embedding" in banner and "MFLOP per token" in banner
  assert "devices: 8 x " in banner and "mesh data 2 x fsdp 4 x expert 1 x tensor 1" in banner
  assert "data: files: " in banner and " documents, " in banner and "epochs" in banner
  assert "tokenizer: ByteTokenizer" in banner
  # configs/tiny.py sets num_steps=200, log_every=20, ...: the overrides that differ are named.
  assert "config: " in banner and "train.num_steps=6" in banner and "train.log_every=1" in banner
  assert f"writing to {full_run}" in banner
  summary = json.loads((full_run / "train_summary.json").read_text())
  assert summary["step"] == 6 and summary["stop_reason"] == "finished"
  assert summary["best_val_loss"] == min(val_losses(full_run)) and summary["final_val_loss"] == val_losses(full_run)[-1]
  assert summary["wall_time_s"] > summary["compile_time_s"] + summary["eval_time_s"] + summary["checkpoint_time_s"]
  assert "finished at step 6 after " in rest and "validation loss: final " in rest and "tokens/s, MFU" in rest


@pytest.mark.slow
def test_loss_png_is_drawn_at_each_eval(full_run):
  plot = pytest.importorskip("jaxlm.training.plot")
  pytest.importorskip("matplotlib")
  assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # What it shows: training and validation loss (two lines), then learning rate, gradient norm, tokens/s.
  assert [len(ax.get_lines()) for ax in plot.figure([full_run]).axes[:5]] == [2, 2, 1, 1, 1]


def test_resume_twice_in_fresh_processes_is_exact(full_run, text_corpus, tmp_path):
  for stop in (2, 4):
    result = run_cli(train_args(text_corpus, tmp_path, f"--config.train.stop_at_step={stop}"))
    assert result.returncode == 75, result.stderr[-3000:]  # EX_TEMPFAIL: stopped early, run it again
    assert json.loads((tmp_path / "train_summary.json").read_text())["stop_reason"] == "stop_at_step"
    assert f"stopped at step {stop}" in result.stderr
  result = run_cli(train_args(text_corpus, tmp_path))
  assert "resumed from step 4" in result.stderr
  # train_summary.json covers the whole run, not its last segment: steps, tokens and times of all three.
  summary = json.loads((tmp_path / "train_summary.json").read_text())
  segments = summary["segment_history"]
  assert summary["segments"] == 3 and [(s["start"], s["step"]) for s in segments] == [(0, 2), (2, 4), (4, 6)]
  assert summary["tokens_trained"] == 6 * 8 * 32 == sum(s["tokens"] for s in segments)
  assert summary["wall_time_s"] == sum(s["wall_time_s"] for s in segments) > segments[-1]["wall_time_s"]
  assert " over 3 runs of the command" in result.stderr
  full, resumed = metrics(full_run), metrics(tmp_path)
  for step in range(1, 7):
    assert resumed[step]["batch_crc32"] == full[step]["batch_crc32"], step
    assert resumed[step]["loss"] == full[step]["loss"], step
  a, b = restore_state(full_run, 6, text_corpus), restore_state(tmp_path, 6, text_corpus)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_eval_restores_onto_one_device_and_onto_eight(full_run):
  results = {}
  for devices in (1, 8):
    out = run_cli(["eval", "--workdir", str(full_run)], devices=devices)
    assert out.returncode == 0, out.stderr[-3000:]
    results[devices] = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert "bits/byte" in out.stdout and "gzip -9" in out.stdout
  np.testing.assert_allclose(results[1]["loss"], results[8]["loss"], rtol=1e-5)
  assert results[1]["tokens"] == results[8]["tokens"] > 0
  assert 0 < results[1]["bits_per_byte"] < 9 and 0 < results[1]["xz-9_bits_per_byte"] < 8


def test_restore_onto_a_different_mesh_is_exact(full_run, text_corpus):
  original = restore_state(full_run, 6, text_corpus)
  cfg = files_config(text_corpus)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1, 2
  s = train_lib.setup(cfg, mesh_lib.make_mesh(cfg))
  target = checkpoint_lib.abstract_with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
  restored = checkpoint_lib.Checkpointer(full_run / "checkpoints", read_only=True).restore(6, target)
  kernel = restored["params"]["decoder"]["layer_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert dict(kernel.sharding.mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
  for x, y in zip(jax.tree.leaves(original), jax.tree.leaves(jax.device_get(restored)), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_incomplete_checkpoint_is_skipped(full_run, text_corpus, tmp_path):
  import shutil

  shutil.copytree(full_run, tmp_path, dirs_exist_ok=True)
  # What a kill -9 during an async save of step 9 leaves behind.
  shutil.copytree(tmp_path / "checkpoints" / "6", tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234")
  result = run_cli(train_args(text_corpus, tmp_path, "--config.train.num_steps=7"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "skipping incomplete checkpoint 9.orbax-checkpoint-tmp-1234" in result.stderr
  assert "resumed from step 6" in result.stderr


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_corpus, tmp_path):
  result = run_cli(
    train_args(
      text_corpus,
      tmp_path,
      "--config.optim.learning_rate=1e30",
      "--config.optim.warmup_steps=0",
      "--config.optim.clip_norm=0.0",
      "--config.train.checkpoint_every=1",
    )
  )
  assert result.returncode == 2
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("jaxlm: error: ") and "Lower optim.learning_rate" in last_line
  steps = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()
  if "No checkpoint has been saved yet" in last_line:  # the update overflowed at step 1: the save guard stops it
    assert "non-finite or overflowing" in last_line and steps == []
    return
  assert "last good checkpoint is step" in last_line
  good = int(last_line.split("last good checkpoint is step ")[1].split(";")[0].split(".")[0])
  assert steps[-1] == good
  cfg = files_config(text_corpus)
  s = train_lib.setup(cfg, mesh_lib.make_mesh(cfg))
  target = {"params": checkpoint_lib.abstract_with_shardings(s.abstract_state.params, s.state_shardings.params)}
  params = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).restore(good, target, partial=True)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


@pytest.mark.slow
def test_sigterm_saves_then_exits(text_corpus, tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jaxlm",
      *train_args(text_corpus, tmp_path, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"),
    ],
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=REPO,
  )
  for line in proc.stderr:
    if "step 2:" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.communicate(timeout=300)[1]
  assert proc.returncode == 143, rest[-3000:]  # 128 + SIGTERM, as a shell reports a killed job
  assert "received signal" in rest
  steps = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 100000


@pytest.mark.slow
def test_two_processes_match_one(full_run, text_corpus, tmp_path):
  """2 processes x 4 CPU devices (gloo) give the losses of 1 process x 8 devices."""
  port = free_port()
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(4),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
  )
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "jaxlm", *train_args(text_corpus, tmp_path)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=REPO,
      env=dict(env, JAX_PROCESS_ID=str(i)),
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  full, multi = metrics(full_run), metrics(tmp_path)
  for step in range(1, 7):
    np.testing.assert_allclose(multi[step]["loss"], full[step]["loss"], rtol=2e-5)
  np.testing.assert_allclose(val_losses(tmp_path), val_losses(full_run), rtol=2e-5)


def test_saved_data_locations_are_absolute_so_eval_works_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.data.paths = "corpus/*.txt"
  c.data.prepared_dir = "shards/web"
  c.data.mixture = "[('shards/web', 0.7), ('gs://bucket/code', 0.3)]"
  saved = trainer._with_absolute_data_paths(c)
  assert saved.data.paths == str(tmp_path / "corpus/*.txt")
  assert saved.data.prepared_dir == str(tmp_path / "shards/web")
  assert mixture.parse(saved.data.mixture) == [(str(tmp_path / "shards/web"), 0.7), ("gs://bucket/code", 0.3)]
  assert c.data.prepared_dir == "shards/web"  # the caller's config is left as it was
