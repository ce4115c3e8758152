"""Checkpoint integrity, the work-directory lock and metrics rollback, tested in-process on tiny states.

The CLI-level fault matrix (corrupted runs, kill -9, disk full) is tests/integration/test_faults.py.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import integrity, runlock


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "step": jnp.array(3, jnp.int32),
    "params": {
      "w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
    },
  }


def _mesh(shape):
  return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), ("data", "fsdp"))


def test_checksum_is_independent_of_sharding_and_sees_one_bit():
  state = _state()
  single = integrity.describe(state)
  sharded = jax.device_put(state["params"]["w"], NamedSharding(_mesh((2, 4)), PartitionSpec("data", "fsdp")))
  assert integrity.describe({"params": {"w": sharded}})["params/w"]["checksum"] == single["params/w"]["checksum"]
  bits = np.asarray(state["params"]["w"]).view(np.uint32).copy()
  bits[5, 3] ^= 1 << 17  # one bit of one element
  flipped = jnp.asarray(bits.view(np.float32))
  assert integrity.describe({"params": {"w": flipped}})["params/w"]["checksum"] != single["params/w"]["checksum"]
  swapped = np.asarray(state["params"]["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same values in other places
  assert (
    integrity.describe({"params": {"w": jnp.asarray(swapped)}})["params/w"]["checksum"]
    != single["params/w"]["checksum"]
  )


def test_non_finite_and_overflowing_states_are_flagged():
  assert integrity.describe({"x": jnp.array([1.0, jnp.nan])})["x"]["finite"] is False
  assert integrity.describe({"x": jnp.array([1e38, 1e38])})["x"]["finite"] is False  # squares overflow
  assert integrity.describe({"x": jnp.array([1e3, -2.0])})["x"]["finite"] is True


def _target(state, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def test_restore_verifies_and_names_damage_and_intact_steps(tmp_path):
  saver = checkpoint_lib.Checkpointer(tmp_path / "ckpt", keep=5)
  for step in (1, 2):
    saver.save(step, _state(step), {"data_position": step})
  saver.close()
  reader = checkpoint_lib.Checkpointer(tmp_path / "ckpt", read_only=True)
  target = _target(_state(), NamedSharding(_mesh((1, 1)), PartitionSpec()))
  restored = reader.restore(2, target)
  np.testing.assert_array_equal(restored["params"]["w"], _state(2)["params"]["w"])
  assert reader.newest_intact_step(target) == 2
  (tmp_path / "ckpt" / "2" / "commit_success.txt").unlink()
  with pytest.raises(
    checkpoint_lib.CheckpointError,
    match=r"step 2 .* is damaged: incomplete, the commit marker 'commit_success.txt' is missing; "
    r"intact steps: 1 \(pass --step 1\)",
  ):
    reader.restore(2, target)
  assert reader.newest_intact_step(target) == 1
  # A changed byte anywhere in a step's files is named, even one no restored array reads.
  assert (tmp_path / "ckpt" / "1" / integrity.FILE_MANIFEST).is_file()
  metadata = tmp_path / "ckpt" / "1" / "state" / "_sharding"
  metadata.write_bytes(metadata.read_bytes() + b" ")
  assert "the file 'state/_sharding' has" in reader.problem(1, target)
  assert reader.newest_intact_step(target) is None
  metadata.write_bytes(metadata.read_bytes()[:-1])
  wrong = _target(
    {"params": {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}, NamedSharding(_mesh((1, 1)), PartitionSpec())
  )
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"does not match this model: array 'params/w' was saved"):
    reader.restore(1, wrong, partial=True)
  reader.close()


def test_non_finite_state_is_never_saved(tmp_path):
  saver = checkpoint_lib.Checkpointer(tmp_path / "ckpt")
  saver.save(1, _state(), {"data_position": 1})
  saver.wait()
  bad = _state()
  bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.inf)
  with pytest.raises(checkpoint_lib.CheckpointError, match="params/w.*not saved. The last good checkpoint is step 1"):
    saver.save(2, bad, {"data_position": 2})
  saver.close()
  assert saver.all_steps() == [1]


def test_a_failed_background_save_is_named_by_its_step(tmp_path, monkeypatch):
  saver = checkpoint_lib.Checkpointer(tmp_path / "ckpt")
  saver.save(1, _state(), {"data_position": 1})
  saver.wait()
  saver.save(2, _state(2), {"data_position": 2})
  saver.wait()

  # Orbax's errors do not always carry the step's folder (the regex's clue): the step comes from the save started.
  def full_disk():
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(saver.manager, "check_for_errors", full_disk)
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"saving step 2 to .* failed \(No space left on device\)"):
    saver.check()
  monkeypatch.undo()
  monkeypatch.setattr(saver.manager, "wait_until_finished", full_disk)
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"saving step 2 to .* failed"):
    saver.save(3, _state(3), {"data_position": 3})  # the previous save's failure, found before starting step 3
  monkeypatch.undo()
  saver.close()
  assert saver.all_steps() == [1, 2]


def test_last_good_sentence():
  assert checkpoint_lib.last_good_sentence(None) == "No checkpoint has been saved yet, so a rerun starts from scratch."
  assert "step 7" in checkpoint_lib.last_good_sentence(7)


HOLD_LOCK = (
  "import sys; from jaxlm.storage import runlock; lock = runlock.WorkdirLock(sys.argv[1]); lock.acquire(); "
  "print('locked', flush=True); sys.stdin.read(); lock.release()"
)


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
  )
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(runlock.LockError, match=rf"pid {holder.pid} on host {socket.gethostname()}"):
    runlock.WorkdirLock(tmp_path).acquire()
  holder.communicate("", timeout=30)  # closes its stdin: it releases and exits
  # A run killed while holding the lock leaves its file behind; the kernel has released the flock.
  (tmp_path / runlock.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone-host"}))
  messages = []
  with runlock.WorkdirLock(tmp_path, report=messages.append):
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert len(messages) == 1 and "stale lock of pid 999999 on host gone-host" in messages[0]
  assert not (tmp_path / runlock.LOCK_NAME).exists()


def test_metrics_after_the_resumed_step_are_rolled_back(tmp_path):
  rows = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}, {"step": 6, "loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
  assert runlock.drop_metrics_after(tmp_path, 4) == 2
  kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in kept] == [2, 4]
  moved = [json.loads(line) for line in (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()]
  assert moved[0] == {"rolled_back_to": 4, "step": 6, "loss": 1.0} and "unparsed" in moved[1]
  assert runlock.drop_metrics_after(tmp_path, 4) == 0
