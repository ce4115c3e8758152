"""The public API: cheap lazy import, the loader, the open trainer's hooks (the docs' Python examples: test_docs.py)."""

import dataclasses
import json
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import REPO, tiny_config

import jaxlm
from jaxlm import families


def test_import_is_lazy_and_changes_no_process_state():
  code = (
    "import sys, jaxlm; heavy = [m for m in ('jax', 'flax', 'orbax', 'jaxlm.training.trainer') if m in sys.modules];"
    "print(heavy); assert callable(jaxlm.load) and callable(jaxlm.train); print('jaxlm.training.trainer' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS=""),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines() == ["[]", "True"]


def test_public_names_resolve_and_are_documented():
  for name in jaxlm.__all__:
    value = getattr(jaxlm, name)
    if callable(value):
      assert value.__doc__, f"jaxlm.{name} has no docstring"
  assert jaxlm.train is jaxlm.training.trainer.train and jaxlm.build_model is jaxlm.models.transformer.build
  with pytest.raises(AttributeError, match="no attribute"):
    jaxlm.no_such_name


class Recorder(jaxlm.Callback):
  def __init__(self):
    self.events = []

  def on_start(self, trainer, step):
    self.events.append(("start", step))

  def on_step(self, trainer, step, metrics):
    self.events.append(("step", step))

  def on_eval(self, trainer, step, metrics):
    self.events.append(("eval", step))

  def on_save(self, trainer, step):
    self.events.append(("save", step))

  def on_end(self, trainer, summary):
    self.events.append(("end", trainer.stop_reason))


def batches(config, seed=0):
  """Ready batches: a deterministic stream of random token rows, B x T."""
  rng = np.random.default_rng(seed)
  shape = (config.train.global_batch_size, config.data.seq_len)
  while True:
    tokens = rng.integers(4, 100, (shape[0], shape[1] + 1)).astype(np.int32)
    yield {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones(shape, np.int32),
      "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
      "weights": np.ones(shape, np.float32),
    }


def test_trainer_hooks_ready_batches_and_resume(tmp_path):
  config = tiny_config()
  config.train.num_steps, config.train.stop_at_step = 4, 2
  config.train.log_every, config.train.checkpoint_every, config.train.eval_every = 1, 2, 2
  first = Recorder()
  eval_batches = [b for _, b in zip(range(2), batches(config, seed=1))]
  jaxlm.train(config, tmp_path, train_data=batches(config), eval_data=eval_batches, callbacks=[first])
  assert first.events == [("start", 0), ("step", 1), ("step", 2), ("eval", 2), ("save", 2), ("end", "stop_at_step")]
  summary = json.loads((tmp_path / "train_summary.json").read_text())
  assert summary["step"] == 2 and summary["stop_reason"] == "stop_at_step"
  assert summary["best_val_loss"] == summary["final_val_loss"] == summary["val_loss"] and summary["best_val_step"] == 2
  assert summary["wall_time_s"] > summary["compile_time_s"] > 0 and summary["eval_time_s"] > 0
  config.train.stop_at_step = 0
  second = Recorder()
  trainer = jaxlm.Trainer(config, tmp_path, train_data=batches(config), callbacks=[second])
  trainer.run()
  assert second.events == [("start", 2), ("step", 3), ("step", 4), ("save", 4), ("end", "finished")]
  assert int(trainer.state.step) == 4
  # The resumed run skipped the two batches already used: step 3 saw the stream's third batch.
  third = [b for _, b in zip(range(3), batches(config))][2]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  crc = {r["step"]: r["batch_crc32"] for r in rows if "batch_crc32" in r}
  assert crc[3] == zlib.crc32(third["inputs"].tobytes())


def test_nan_loss_stops_naming_the_last_good_checkpoint(tmp_path):
  config = tiny_config()
  config.train.num_steps, config.train.checkpoint_every = 6, 2

  def poisoned():  # batch 4 (step 4) carries a NaN weight, so its loss is NaN
    for index, batch in enumerate(batches(config)):
      if index == 3:
        batch["weights"][0, 0] = np.nan
      yield batch

  with pytest.raises(
    jaxlm.training.trainer.TrainingError, match=r"loss is nan .* at step 4; .*last good checkpoint is step 2"
  ):
    jaxlm.train(config, tmp_path, train_data=poisoned())
  assert jaxlm.load(tmp_path).step == 2


def test_load_builds_no_optimizer_keeps_the_config_and_shards_onto_a_mesh(tmp_path, caplog):
  config = tiny_config()
  config.train.num_steps, config.train.checkpoint_every = 2, 2
  config.mesh.data, config.mesh.fsdp = 2, 4
  jaxlm.train(config, tmp_path, train_data=batches(config))
  saved = (tmp_path / "config.json").read_text()
  caplog.clear()
  with caplog.at_level("WARNING"):
    run = jaxlm.load(tmp_path)
  assert [r.getMessage() for r in caplog.records] == []  # Orbax's read-only warnings are expected: silenced
  assert (tmp_path / "config.json").read_text() == saved and run.config.mesh.fsdp == 4 and run.step == 2
  kernel = run.params["decoder"]["layer_0"]["mlp"]["up"]["kernel"]
  assert len(kernel.sharding.device_set) == 1
  mesh = jaxlm.make_mesh(run.config)
  sharded = jaxlm.load(tmp_path, step=2, mesh=mesh).params["decoder"]["layer_0"]["mlp"]["up"]["kernel"]
  assert sharded.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_array_equal(jax.device_get(sharded), jax.device_get(kernel))
  assert "opt_state" not in run._fields and not hasattr(run, "tx")


def test_a_fourth_family_registers_without_touching_jaxlm(tmp_path):
  decoder = families.get("decoder")
  families.register(dataclasses.replace(decoder, name="decoder_copy"))
  try:
    cfg = tiny_config().model
    cfg.family = "decoder_copy"
    module = jaxlm.build_model(cfg)
    tokens = jnp.ones((1, 8), jnp.int32)
    assert module.init(jax.random.key(0), tokens)["params"]
    assert "decoder_copy" in families.names()
  finally:
    families._REGISTRY.pop("decoder_copy")
  with pytest.raises(ValueError, match="model.family 'nope' is unknown; choose one of decoder"):
    families.get("nope")
