"""The training loop: data, steps, metrics, validation and checkpoints.

Resumes from the latest complete checkpoint in the work directory, including
the data position, so an interrupted run continues with exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import tqdm

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import corpus
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import metrics as metrics_lib
from jaxlm import sharding, tokenizer as tokenizer_lib, train as train_lib


class TrainingError(RuntimeError):
  pass


def log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self.previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True
    log(f"received signal {signum}: saving a checkpoint, then exiting")

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def write_run_files(config, workdir: Path, tokenizer) -> None:
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  tokenizer.save(workdir)


def _with_absolute_data_paths(config):
  """A copy of `config` whose file globs are absolute, so `jaxlm eval` works from any folder."""
  if config.data.source != "files":
    return config
  config = config.copy_and_resolve_references()
  config.data.paths = corpus.absolute_patterns(config.data.paths)
  config.data.validation_paths = corpus.absolute_patterns(config.data.validation_paths)
  return config


def prepare_data(config, tokenizer, split: str):
  """The split's random-access rows for the model family."""
  if config.model.family == "encoder_decoder":
    from jaxlm import seq2seq_data
    return seq2seq_data.prepare(config, tokenizer, split)
  if config.model.family == "encoder":
    from jaxlm import mlm
    return mlm.prepare(config, tokenizer, split)
  return data_lib.decoder_rows(config, tokenizer, split)


def load_tokenizer(config):
  if config.data.tokenizer == "sentencepiece" and config.data.spm_vocab_size:
    from jaxlm import spm
    spm.train_if_missing(config)
  tokenizer = tokenizer_lib.from_config(config.data)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
        f"set --config.model.vocab_size={tokenizer.vocab_size}")
  return tokenizer


def evaluate_loss(eval_step, params, rows, s: train_lib.Setup, max_batches: int) -> dict[str, float]:
  totals = {}
  for local in data_lib.eval_batches(rows, s.config.eval.batch_size, max_batches):
    sums = eval_step(params, sharding.global_batch(local, s.batch_sharding))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  return totals


def train(config, workdir: str | Path) -> dict[str, float]:
  """Trains per `config` in `workdir`; returns the last logged metrics."""
  workdir = Path(workdir)
  sharding.maybe_initialize_distributed(config)
  config_lib.validate(config, jax.device_count())
  config = _with_absolute_data_paths(config)
  tokenizer = load_tokenizer(config)
  if config.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
  write_run_files(config, workdir, tokenizer)

  train_rows = prepare_data(config, tokenizer, "train")
  val_rows = prepare_data(config, tokenizer, "validation")
  mesh = sharding.make_mesh(config)
  s = train_lib.setup(config, mesh)
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  for path in checkpointer.incomplete():
    log(f"skipping incomplete checkpoint {path.name} (an interrupted save); resuming from the last complete one")

  start = checkpointer.latest_step()
  if start is None:
    state = train_lib.create_state(s, config.seed)
    start = 0
  else:
    target = checkpoint_lib.abstract_with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
    state = train_lib.TrainState(**checkpointer.restore(start, target))
    data_position = checkpointer.read_meta(start)["data_position"]
    if data_position != start:
      raise TrainingError(f"checkpoint {start} has data position {data_position}; expected {start}")
    log(f"resumed from step {start} in {checkpointer.directory}")
  return _loop(config, workdir, s, state, start, train_rows, val_rows, checkpointer)


def _loop(config, workdir, s, state, start, train_rows, val_rows, checkpointer) -> dict[str, float]:
  t = config.train
  train_step = train_lib.make_train_step(s)
  eval_step = train_lib.make_eval_step(s, s.state_shardings.params)
  batches = data_lib.train_batches(train_rows, t.global_batch_size, config.data.shuffle_seed, start, t.num_steps,
                                   config.data.prefetch_threads)
  writer = metrics_lib.MetricWriter(workdir)
  flops_per_step = metrics_lib.flops_per_token(config.model, config.data.seq_len) * t.global_batch_size * config.data.seq_len
  peak = metrics_lib.measure_matmul_peak(dtype=train_lib.compute_dtype(config)) * jax.device_count()
  rng = jax.random.key(config.seed + 1)
  meta = lambda step: {"config": config.to_dict(), "data_position": step}

  last, window_start, window_steps = {}, time.perf_counter(), 0
  progress = tqdm.tqdm(total=t.num_steps, initial=start, disable=jax.process_index() != 0,
                       dynamic_ncols=True, desc="train")
  try:
    with _StopRequest() as stop:
      for step in range(start, t.num_steps):
        local_batch = next(batches)
        batch = sharding.global_batch(local_batch, s.batch_sharding)
        state, step_metrics = train_step(state, batch, rng)
        window_steps += 1
        done = step + 1
        progress.update(1)
        # Read the flag once: a signal landing later in this iteration is handled after the next step.
        stopping = stop.requested or done == t.stop_at_step
        is_save = done % t.checkpoint_every == 0 or done == t.num_steps or stopping
        if done % t.log_every == 0 or is_save or done == start + 1:
          values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          # Identifies the batch this process fed, so resumed runs can be checked against uninterrupted ones.
          values["batch_crc32"] = float(zlib.crc32(local_batch["inputs"].tobytes()))
          if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise TrainingError(
                f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {done}; stopped without "
                f"saving. The last good checkpoint is step {checkpointer.latest_step()}. Lower "
                "optim.learning_rate or raise optim.warmup_steps.")
          elapsed = time.perf_counter() - window_start
          if done > start + 1:  # the first step's time is compilation
            values["step_time_s"] = elapsed / window_steps
            values["tokens_per_s"] = t.global_batch_size * config.data.seq_len / values["step_time_s"]
            values["mfu"] = flops_per_step / values["step_time_s"] / peak
          writer.write(done, values)
          progress.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
          log(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("tokens", "batch_crc32")))
          last = values
          window_start, window_steps = time.perf_counter(), 0
        if done % t.eval_every == 0 or done == t.num_steps:
          totals = evaluate_loss(eval_step, state.params, val_rows, s, t.eval_batches)
          val = {"val_loss": totals["nll_sum"] / max(totals["weight_sum"], 1)}
          writer.write(done, val)
          log(f"step {done}: validation loss {val['val_loss']:.4f}")
          last.update(val)
          window_start, window_steps = time.perf_counter(), 0
        if is_save:
          checkpointer.save(done, state.to_dict(), meta(done))
        if stopping:
          log(f"stopped at step {done}; resume by running the same command")
          break
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
  if jax.process_index() == 0:
    (Path(workdir) / "train_summary.json").write_text(json.dumps(last, indent=2))
  return last
