"""XLA's memory estimate of the compiled train step against the device, and the step compiled once."""

import logging

import jax
import numpy as np
import pytest
from support import error_line, files_config, run_cli, tiny_config, train_args

from jaxlm import config as config_lib
from jaxlm.data import feed
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import memory, trainer
from jaxlm.training import step as train_step


class FakeAccelerator:
  """A device whose memory_stats report `bytes_limit`, as a GPU's or TPU's do."""

  platform = "gpu"

  def __init__(self, bytes_limit: int):
    self.bytes_limit = bytes_limit

  def memory_stats(self) -> dict:
    return {"bytes_limit": self.bytes_limit}


def test_the_tiny_step_fits_by_xla_and_runs_the_pipelines_batches_donating_the_state(text_corpus):
  config = files_config(text_corpus)
  s = train_step.setup(config, mesh_lib.make_mesh(config))
  step = memory.compile_train_step_that_fits(s)
  estimate = memory.step_memory(step.compiled)
  assert estimate.temporaries > 0 and estimate.arguments >= sharding.shard_bytes(s.abstract_state, s.state_shardings)
  assert estimate.aliased > 0  # the donated state is written in place
  assert 0 < estimate.peak < sharding.available_bytes(jax.local_devices()[0])[0]

  rows = trainer.prepare_data(config, trainer.load_tokenizer(config), "train")
  local = next(feed.Feed(rows=rows).train_batches(config.train.global_batch_size, 0, 0, 1))
  batch = sharding.global_batch(local, s.batch_sharding)
  assert step.compiled_for(batch)  # so the trainer runs the executable whose memory was checked
  assert not step.compiled_for({**batch, "inputs": batch["inputs"][:, :16]})
  state = train_step.create_state(s, config.seed)
  new_state, metrics = step(state, batch, jax.random.key(1))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))  # donated, as by the jitted step
  assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_the_refusal_names_the_largest_part_and_its_fix():
  config, gib = tiny_config(), 1024**3
  activations = memory.StepMemory(arguments=gib, outputs=gib, aliased=gib, temporaries=30 * gib, code=0)
  with pytest.raises(
    config_lib.ConfigError,
    match=r"needs about 31\.0 GiB .*\(temporaries \(activations, "
    r"gradients\) 30\.0 GiB, .*is 4\.0 GiB.*train\.global_batch_size",
  ):
    memory.check_step_fits(activations, gib // 2, config, FakeAccelerator(4 * gib))
  memory.check_step_fits(activations, gib // 2, config, FakeAccelerator(32 * gib))  # fits: no error
  state = memory.StepMemory(arguments=20 * gib, outputs=20 * gib, aliased=20 * gib, temporaries=gib, code=0)
  with pytest.raises(config_lib.ConfigError, match=r"\(train state 20\.0 GiB, .*mesh\.fsdp"):
    memory.check_step_fits(state, 20 * gib, config, FakeAccelerator(4 * gib))


def test_training_compiles_the_step_once(text_corpus, tmp_path, caplog):
  config = files_config(text_corpus)
  config.train.num_steps, config.train.eval_every, config.train.checkpoint_every = 2, 2, 2
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    summary = trainer.train(config, tmp_path / "run")
  # Once for the whole run: the executable compiled for the memory check trains (a state or batch of other
  # shapes or placements would make the step compile again).
  assert summary["step"] == 2 and summary["compile_time_s"] > 0
  compilations = [r for r in caplog.records if "Finished XLA compilation of jit(step_fn)" in r.getMessage()]
  assert len(compilations) == 1, [r.getMessage() for r in compilations]


def test_a_step_whose_activations_cannot_fit_stops_in_one_line_before_any_step(text_corpus, tmp_path):
  # A tiny model (about 100 MB of state) whose logits alone, 65,536 rows x 32 tokens x 262,144 classes in
  # float32, are 2 TiB: more than any host, in any split over the 8 devices. The corpus is repeated to hold
  # that many rows, as the data check comes first.
  text = b"".join(path.read_bytes() for path in sorted(text_corpus.glob("*.txt")))
  corpus_directory = tmp_path / "corpus"
  corpus_directory.mkdir()
  for index in range(8):
    (corpus_directory / f"doc{index}.txt").write_bytes(text * 8)
  workdir = tmp_path / "run"
  result = run_cli(
    train_args(corpus_directory, workdir, "--config.train.global_batch_size=65536", "--config.model.vocab_size=262144")
  )
  assert result.returncode == 2, result.stderr[-3000:]
  line = error_line(result)
  assert "the train step needs about" in line and "by XLA's memory analysis" in line, line
  assert line.index("temporaries") < line.index("train state"), line  # the largest part comes first
  assert "available host memory per CPU device" in line and "train.global_batch_size" in line, line
  assert "step 1:" not in result.stderr and not (workdir / "metrics.jsonl").exists()
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
