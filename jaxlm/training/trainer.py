"""The training loop: data, steps, metrics, validation, checkpoints, signals and the NaN stop.

`Trainer` is open: it takes any Flax module meeting `jaxlm.families.LanguageModel`,
the user's data (strings, rows or batches; see `jaxlm.data.feed`), any loss
(`jaxlm.training.step.LossFn`) and `Callback`s. `jaxlm train` is one caller:
`train(config, workdir)` with the config's family model, data and cross-entropy.

Resumes from the latest complete checkpoint in the work directory, including
the data position, so an interrupted run continues with exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import tqdm

from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.config import Config
from jaxlm.data import corpus, feed, mixture, pipeline
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import JaxlmError
from jaxlm.models import lora
from jaxlm.parallel import distributed, sharding
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.storage import checkpoint as checkpoint_lib
from jaxlm.storage import fs, run_dir, runlock
from jaxlm.training import flops as metrics_lib
from jaxlm.training import init_from, memory, plot, profiling, tracking
from jaxlm.training import progress as progress_lib
from jaxlm.training import report as run_report
from jaxlm.training import step as train_step

# Steps the host may dispatch before the device has finished them: dispatch is asynchronous, and without a bound
# the host ran ~30 steps ahead, so the bar counted steps not yet computed and a stop waited for all of them.
# Two keep the device busy (the next step is queued while one runs) and the bar within two steps of the truth.
RUN_AHEAD_STEPS = 2


class TrainingError(JaxlmError, RuntimeError):
  """Training cannot go on (a NaN loss, a checkpoint at the wrong data position); one line with the fix."""


def log(message: str) -> None:
  """Writes `message` to stderr above the progress bar, on process 0 only."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


class Callback:
  """Hooks into `Trainer.run`; subclass and override any. Each gets the `Trainer` (`trainer.state`,
  `trainer.config`, `trainer.workdir`, `trainer.checkpointer`, ...). They run on every process.

  on_start(trainer, step): the state is ready (fresh, or restored at `step`).
  on_step(trainer, step, metrics): after each logged step (every `train.log_every`, the first and each save);
    `metrics` is the dict of floats written to metrics.jsonl.
  on_eval(trainer, step, metrics): after each validation, with {'val_loss': ...} and val_NAME for each extra
    term NAME_sum of the loss (`jaxlm.LossFn`).
  on_save(trainer, step): after a checkpoint save of `step` started (saves are asynchronous).
  on_end(trainer, summary): after the loop, with what train_summary.json holds; `trainer.stop_reason` says
    why it ended: 'finished', 'sigint', 'sigterm' or 'stop_at_step'. Not called when training fails.
  """

  def on_start(self, trainer: "Trainer", step: int) -> None:
    """The state is ready at `step` (0, or the step resumed from)."""

  def on_step(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
    """A logged step finished; `metrics` as written to metrics.jsonl."""

  def on_eval(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> None:
    """A validation at `step` finished: {'val_loss': ...}."""

  def on_save(self, trainer: "Trainer", step: int) -> None:
    """A checkpoint save of `step` started."""

  def on_end(self, trainer: "Trainer", summary: dict[str, float]) -> None:
    """The loop ended (`trainer.stop_reason`); `summary` is what train_summary.json holds."""


class _StopRequest:
  """Turns SIGTERM/SIGINT into a stop the loop checks, so it can save and exit cleanly.

  One process reads its own flag. The processes of a multi-process run must stop after the same step, or one
  saves while another runs the next step and both hang in its collectives; a scheduler (SLURM's requeue or
  scancel) signals every process, but at slightly different moments. So there JAX's preemption service decides:
  `jax.distributed.initialize` installs its SIGTERM handler (kept: it also catches a SIGTERM during start-up),
  a notice to any process reaches all of them, and they agree on the step after the furthest one's
  (`multihost_utils.reached_preemption_sync_point`). SIGINT is passed to it as a SIGTERM.
  """

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self.previous = {}
    self.sync = distributed.preemption_service_on()

  def __enter__(self):
    for sig in (signal.SIGINT,) if self.sync else (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name.lower()
    log(f"received signal {signum}: saving a checkpoint, then exiting")
    if self.sync:
      signal.raise_signal(signal.SIGTERM)  # to JAX's notifier, which tells the other processes
    else:
      self.requested = True

  def reached(self, steps_run: int) -> bool:
    """Whether to stop after this process's `steps_run`-th step since the loop started (0 before the first).

    Counted from the loop's start, which all processes share, since JAX's protocol takes a notice that came
    before any step (during start-up) as a stop after the first one."""
    if not self.sync:
      return self.requested
    if distributed.reached_stop_point(steps_run):
      if not self.signal_name:  # the signal went to JAX's handler, or to another process
        self.signal_name = "sigterm"
        log("received SIGTERM (here or in another process): saving a checkpoint, then exiting")
      return True
    return False

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def _with_absolute_data_paths(config: Config) -> Config:
  """A copy of `config` whose data files and folders are absolute, so `jaxlm eval` works from any folder."""
  config = config.copy_and_resolve_references()
  data = config.data
  data.paths = corpus.absolute_patterns(data.paths)
  data.validation_paths = corpus.absolute_patterns(data.validation_paths)
  if data.prepared_dir:
    data.prepared_dir = os.fspath(fs.absolute(data.prepared_dir))
  if data.mixture:
    data.mixture = repr([(os.fspath(fs.absolute(folder)), weight) for folder, weight in mixture.parse(data.mixture)])
  return config


def prepare_data(config: Config, tokenizer, split: str):
  """The split's random-access rows, prepared by the family of the whole `config`."""
  return families.get(config.model.family).rows(config, tokenizer, split)


def load_tokenizer(config: Config, check: bool = True) -> tokenizer_lib.Tokenizer:
  """The tokenizer the whole `config` names (training a SentencePiece vocabulary first if asked); with `check`,
  `check_vocab_size` first."""
  if config.data.tokenizer == "sentencepiece" and config.data.spm_vocab_size:
    from jaxlm.data import spm

    spm.train_if_missing(config)
  tokenizer = tokenizer_lib.from_config(config.data)
  if check:
    check_vocab_size(config, tokenizer)
  return tokenizer


def check_vocab_size(config: Config, tokenizer) -> None:
  """ConfigError when `config.model.vocab_size` cannot hold the tokenizer's ids."""
  if config.model.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(
      f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
      f"set --config.model.vocab_size={tokenizer.vocab_size}"
    )


class Trainer:
  """The training loop over any model, data and loss; `run()` trains and returns the last metrics.

  config: the whole config (optimizer, schedule, mesh, steps, checkpointing, logging; `config.model` is used
    to build the default model and to count FLOPs).
  workdir: where config.json, the tokenizer, checkpoints/, metrics.jsonl, tensorboard/ and
    train_summary.json go; an existing run there is resumed.
  model: a Flax module meeting `jaxlm.families.LanguageModel`; default the family model of `config.model`
    (with dropout on). `trainer.model` is the module trained once `run` has built it; `trainer.logits(batch)`
    applies it in evaluation mode under the run's mesh and rules.
  train_data, eval_data: strings, random-access rows or ready batches (`jaxlm.data.feed`); default the
    config's data. With `train_data` given and no `eval_data`, there is no validation.
  loss_fn: a `jaxlm.training.step.LossFn`; default cross-entropy (`train_step.cross_entropy_loss`).
  tokenizer: a `jaxlm.data.tokenizer.Tokenizer`; default the one the config names. It is saved into `workdir`.
  callbacks: `Callback`s called at the loop's events.
  origin: where the config came from, for the banner (the CLI passes the file and the overrides).
  """

  def __init__(
    self,
    config: Config,
    workdir: str | Path,
    *,
    model: nn.Module | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    loss_fn: train_step.LossFn | None = None,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
    callbacks: Sequence[Callback] = (),
    origin: str = "",
  ):
    self.config, self.workdir, self.origin = config, fs.path(workdir), origin  # a local folder or gs://
    self.model, self.loss_fn, self.tokenizer = model, loss_fn, tokenizer
    self.train_data, self.eval_data = train_data, eval_data
    self.callbacks = list(callbacks)
    self.state: train_step.TrainState | None = None
    self.setup: train_step.Setup | None = None
    self.step_fn: train_step.CompiledStep | None = None  # compiled before the state exists, once it fits
    self.checkpointer: checkpoint_lib.Checkpointer | None = None
    self.lock: runlock.WorkdirLock | None = None  # the work directory's, held while `run` runs
    self.peak: metrics_lib.PeakFlops | None = None  # what MFU divides by
    self.stop_reason: str | None = None
    self.timings = {"compile_time_s": 0.0, "eval_time_s": 0.0, "checkpoint_time_s": 0.0}
    self._logits_fn = None  # `logits`' jitted forward pass, made on first use

  def _emit(self, event: str, *args) -> None:
    for callback in self.callbacks:
      getattr(callback, event)(self, *args)

  def _feeds(self, config, tokenizer) -> tuple[feed.Feed, feed.Feed | None]:
    if self.train_data is None:
      train = feed.Feed(rows=prepare_data(config, tokenizer, "train"))
    else:
      train = feed.from_user(self.train_data, config, tokenizer, "train_data")
    if self.eval_data is not None:
      return train, feed.from_user(self.eval_data, config, tokenizer, "eval_data")
    if self.train_data is not None:
      return train, None
    return train, feed.Feed(rows=prepare_data(config, tokenizer, "validation"))

  def run(self) -> dict[str, float]:
    """Trains to `train.num_steps` (or a stop), resuming from `workdir`; returns the summary that
    train_summary.json holds (the last logged metrics, step, stop_reason, timings, validation losses)."""
    self.started = time.perf_counter()
    distributed.maybe_initialize_distributed(self.config)
    fs.check_run_access(self.workdir, self.config.data)  # a bucket problem: one line, before compiling
    if init_from.enabled(
      self.config
    ):  # another run's model and tokenizer (jaxlm/training/init_from.py), then validated
      self.config = init_from.resolve(self.config, self.workdir, log, self.model)
    config_lib.validate(self.config, jax.device_count())
    profiling.parse_steps(self.config.train.get("profile_steps", ""))  # malformed: one line, before compiling
    self.lock = runlock.WorkdirLock(self.workdir, report=log)
    if jax.process_index() == 0:  # the other processes share process 0's work directory
      self.lock.acquire()
    try:
      return self._run_locked()
    except Exception:
      # A peer killed during a save or a step breaks the collective in this process first (gloo: "Connection
      # closed by peer"): name the lost process, not the symptom.
      distributed.name_a_lost_peer()
      raise
    finally:
      self.lock.release()

  def _run_locked(self) -> dict[str, float]:
    """`run` once the work directory is locked: data, setup, resume, then the loop."""
    config = self.config = _with_absolute_data_paths(self.config)
    if lora.enabled(config):  # adapters over a frozen base run: its model, step and tokenizer (jaxlm/models/lora.py)
      config = self.config = lora.resolve_base(config, log, self.workdir)
      if self.tokenizer is None:
        self.tokenizer = tokenizer_lib.load(fs.path(config.lora.base_workdir))
    # The caller's own token ids (rows or batches, no tokenizer given) may use a vocabulary smaller than the
    # tokenizer's, which is then only saved with the run; strings are tokenized, so they need it to fit.
    own_ids = self.tokenizer is None and self.train_data is not None
    if self.tokenizer is None:
      self.tokenizer = load_tokenizer(config, check=not own_ids)
    else:
      check_vocab_size(config, self.tokenizer)
    train_source, eval_source = self._feeds(config, self.tokenizer)
    sources = [source for source in (train_source, eval_source) if source is not None]
    if own_ids and any(isinstance(source.rows, pipeline.PackedRows) for source in sources):  # strings, tokenized
      check_vocab_size(config, self.tokenizer)
    if config.train.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", config.train.compilation_cache_dir)
    run_dir.write_run_files(self.workdir, config, self.tokenizer)

    mesh = mesh_lib.make_mesh(config)
    if self.model is None and lora.enabled(config):
      self.model = lora.adapted_model(config, lora.base_params(config, mesh))
    elif isinstance(self.model, lora.AdaptedModel):  # `jaxlm.apply_lora`'s: its base onto this run's mesh
      self.model = lora.on_mesh(self.model, mesh, config_lib.mesh_rules(config))
    s = self.setup = train_step.setup(config, mesh, self.model, self.loss_fn)
    self.model = s.model  # the module trained, the config's family model by default, for callbacks
    # Both refuse a step too big for a device in one line, before any state exists: the state count first
    # (no tracing), then XLA's analysis of the compiled step, activations included (jaxlm/training/memory.py).
    sharding.check_state_fits(s.abstract_state, s.state_shardings, s.abstract_state.params)
    compile_start = time.perf_counter()
    self.step_fn = memory.compile_train_step_that_fits(s)
    self.timings["compile_time_s"] = time.perf_counter() - compile_start
    checkpointer = self.checkpointer = checkpoint_lib.Checkpointer(
      self.workdir / "checkpoints", keep=config.train.keep_checkpoints
    )
    self.peak = metrics_lib.PeakFlops(config, mesh.size)
    for path in checkpointer.incomplete():
      log(f"skipping incomplete checkpoint {path.name} (an interrupted save); resuming from the last complete one")

    target = checkpoint_lib.abstract_with_shardings(s.abstract_state.to_dict(), s.state_shardings.to_dict())
    # Damaged steps are reported and moved aside; a run whose every checkpoint is damaged starts over.
    start, restored = checkpointer.restore_newest_intact(target, log)
    if start is None:
      self.state = train_step.create_state(s, config.seed)
      if init_from.enabled(config):  # a new run, not a restart: the base run's parameters
        self.state = init_from.initial_state(self.state, s, config, log)
      start = 0
    else:
      self.state = train_step.TrainState(**restored)
      data_position = checkpointer.read_meta(start)["data_position"]
      if data_position != start:
        raise TrainingError(f"checkpoint {start} has data position {data_position}; expected {start}")
      log(f"resumed from step {start}, the newest intact checkpoint in {checkpointer.directory}")
    if jax.process_index() == 0 and (dropped := runlock.drop_metrics_after(self.workdir, start)):
      log(f"moved {dropped} metrics.jsonl row(s) logged after step {start} to metrics.rolled_back.jsonl")
    for line in run_report.banner(self, start, train_source.rows, self.origin):
      log(line)
    self._emit("on_start", start)
    return self._loop(start, train_source, eval_source)

  def _validate(self, eval_step, eval_source: feed.Feed) -> dict[str, float]:
    t = self.config.train
    batches = [0]

    def counted(local_batches):
      for local in local_batches:
        batches[0] += 1
        yield local

    totals = train_step.evaluate_loss(
      eval_step,
      self.state.params,
      counted(eval_source.eval_batches(self.config.eval.batch_size, t.eval_batches)),
      self.setup.batch_sharding,
    )
    # What the validation line says it scored: `jaxlm eval --max-batches N` scores the same N batches.
    self.validation_scope = f"{batches[0]} batch{'es' * (batches[0] != 1)}, {totals['weight_sum']:,.0f} tokens"
    weight = max(totals["weight_sum"], 1)
    terms = train_step.loss_terms(totals, weight)  # the loss's extra terms, as the train step reports them
    return {"val_loss": totals.get("nll_sum", totals["loss_sum"]) / weight} | {f"val_{k}": v for k, v in terms.items()}

  def _loop(self, start: int, train_source: feed.Feed, eval_source: feed.Feed | None) -> dict[str, float]:
    config, s, checkpointer = self.config, self.setup, self.checkpointer
    t = config.train
    step_fn = self.step_fn
    eval_step = train_step.make_eval_step(s, s.state_shardings.params)
    batches = train_source.train_batches(
      t.global_batch_size, config.data.shuffle_seed, start, t.num_steps, config.data.prefetch_threads
    )
    writer = tracking.MetricWriter(self.workdir, config)
    # FLOPs of what trains: a LoRA run's frozen weights cost no weight gradient (jaxlm/training/flops.py).
    flops_per_step = metrics_lib.training_flops_per_token(config) * t.global_batch_size * config.data.seq_len
    profiler = profiling.StepProfiler(t.get("profile_steps", ""), self.workdir, log)
    if eval_source is not None and jax.process_index() == 0 and not plot.available():
      log(f"no {fs.join(self.workdir, 'loss.png')} at evaluations: it needs matplotlib ({plot.INSTALL})")
    rng = jax.random.key(config.seed + 1)
    meta = lambda step: {"config": config.to_dict(), "data_position": step}

    last, done, validations = {}, start, {}
    # Step time: the seconds between a log line (or a validation, or a save) and the next, so what runs
    # between steps counts in neither tokens/s nor MFU.
    window_steps, window_seconds, resumed_at = 0, 0.0, time.perf_counter()
    self.stop_reason = "finished"
    progress = progress_lib.Progress(start, t.num_steps, enabled=jax.process_index() == 0)
    in_flight = collections.deque()  # (step, its loss) of the steps dispatched and not yet seen finished
    try:
      with _StopRequest() as stop:
        for step in range(start, t.num_steps):
          local_batch = next(batches)
          batch = sharding.global_batch(local_batch, s.batch_sharding)
          resumed_at += profiler.before_step(step + 1)  # tracing is not step time
          self.state, step_metrics = step_fn(self.state, batch, rng)
          window_steps += 1
          done = step + 1
          resumed_at += profiler.after_step(done, step_metrics)
          # Wait for step done - RUN_AHEAD_STEPS: the bar shows finished steps and their loss, and a stop or a save
          # waits for at most RUN_AHEAD_STEPS steps; the device still holds the next ones, so it never idles.
          in_flight.append((done, step_metrics["loss"]))
          if len(in_flight) > RUN_AHEAD_STEPS:
            finished, loss = in_flight.popleft()
            progress.update(finished, float(loss))
          checkpointer.check()  # a failed asynchronous save (a full disk) stops the run at once
          # Read once: a signal landing later in this iteration is handled after the next step.
          stopping = stop.reached(done - start) or done == t.stop_at_step
          is_save = done % t.checkpoint_every == 0 or done == t.num_steps or stopping
          if done % t.log_every == 0 or is_save or done == start + 1:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            window_seconds += time.perf_counter() - resumed_at
            if done == start + 1:  # the first step's time (warm-up) counts with the compilation
              self.timings["compile_time_s"] += window_seconds
              progress.eta.start(done)
            if "inputs" in local_batch:
              # Identifies the batch this process fed, so resumed runs can be checked against uninterrupted ones.
              values["batch_crc32"] = float(zlib.crc32(local_batch["inputs"].tobytes()))
            # A mixture's realized shares of the rows of the steps since the last log (mixture/NAME).
            values.update(
              mixture.realized_proportions(
                train_source.rows, config.data.shuffle_seed, done - window_steps, done, t.global_batch_size
              )
            )
            if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
              checkpointer.wait()  # a save still in flight is the last good checkpoint: finish it, then name it
              raise TrainingError(
                f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {done}; stopped without "
                f"saving. {checkpoint_lib.last_good_sentence(checkpointer.newest_complete_step())} Lower "
                "optim.learning_rate or raise optim.warmup_steps."
              )
            if done > start + 1 and window_steps:  # the first step's time is compilation
              values["step_time_s"] = window_seconds / window_steps
              values["tokens_per_s"] = t.global_batch_size * config.data.seq_len / values["step_time_s"]
              values["peak_flops"] = self.peak.flops  # fixed: published, or this machine's cached nominal peak
              values["mfu"] = flops_per_step / values["step_time_s"] / values["peak_flops"]
              progress.eta.observe(done, window_steps, window_seconds)
            writer.write(done, values)
            in_flight.clear()  # reading this step's metrics waited for it and every step before
            progress.update(done, values["loss"])
            log(
              f"step {done}: "
              + ", ".join(
                f"{k} {v:.4g}" for k, v in values.items() if k not in ("tokens", "batch_crc32", "mfu", "peak_flops")
              )
              + (
                f", {metrics_lib.format_mfu(values['mfu'], values['peak_flops'], self.peak)}" if "mfu" in values else ""
              )
              + f" ({progress.line_suffix(done)})"
            )
            last = values
            self._emit("on_step", done, values)
            window_steps, window_seconds, resumed_at = 0, 0.0, time.perf_counter()
          if eval_source is not None and (done % t.eval_every == 0 or done == t.num_steps):
            eval_start = time.perf_counter()
            window_seconds += eval_start - resumed_at
            val = self._validate(eval_step, eval_source)
            self.timings["eval_time_s"] += time.perf_counter() - eval_start
            validations[done] = val["val_loss"]
            writer.write(done, val)
            log(
              f"step {done}: validation loss {val['val_loss']:.4f} on {self.validation_scope}"
              + "".join(f", {k} {v:.4g}" for k, v in val.items() if k != "val_loss")
            )
            last.update(val)
            self._emit("on_eval", done, val)
            if jax.process_index() == 0:
              plot.write_run_plot(self.workdir)  # RUN/loss.png, when matplotlib is installed
            resumed_at = time.perf_counter()
          if is_save:
            self.lock.check()  # a bucket lock taken over meanwhile: another run now owns the checkpoints
            save_start = time.perf_counter()
            window_seconds += save_start - resumed_at
            checkpointer.save(done, self.state.to_dict(), meta(done))
            self.timings["checkpoint_time_s"] += time.perf_counter() - save_start
            self._emit("on_save", done)
            resumed_at = time.perf_counter()
          if stopping:
            self.stop_reason = stop.signal_name or "stop_at_step"
            log(f"stopped at step {done}; resume by running the same command")
            break
    finally:
      # Stopping on an error: the metrics' last upload to a bucket that is gone fails too; report the first failure.
      failing = sys.exc_info()[1] is not None
      profiler.stop(self.state)  # a trace still running (the run stopped inside the range) keeps what it has
      progress.close()
      close_start = time.perf_counter()
      checkpointer.close()  # waits for the last asynchronous save
      self.timings["checkpoint_time_s"] += time.perf_counter() - close_start
      try:
        writer.close()
      except JaxlmError:
        if not failing:
          raise
      finally:
        if failing:
          writer.finish(None)
    summary = self._summary(start, done, last, validations)
    if jax.process_index() == 0:
      (self.workdir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    writer.finish(summary)
    for line in run_report.summary_lines(summary):
      log(line)
    self._emit("on_end", summary)
    return summary

  def _earlier_segments(self, start: int) -> list[dict]:
    """The segments (runs of the command) before this one that resumed at `start`, from train_summary.json:
    those that began before `start`, their steps cut at it (a resume from an older checkpoint redoes the rest;
    the time they took still counts)."""
    location = self.workdir / "train_summary.json"
    if start == 0 or jax.process_index() != 0 or not location.exists():
      return []
    try:
      segments = json.loads(location.read_text()).get("segment_history", [])
    except ValueError:  # a summary half-written when the machine went down: this run's totals start here
      return []
    per_step = self.config.train.global_batch_size * self.config.data.seq_len
    kept = [dict(segment) for segment in segments if segment["start"] < start]
    for segment in kept:
      segment["step"] = min(segment["step"], start)
      segment["tokens"] = (segment["step"] - segment["start"]) * per_step
    return kept

  def _summary(self, start: int, step: int, last: dict[str, float], validations: dict[int, float]) -> dict:
    """What train_summary.json holds: the last metrics, and times, steps and tokens (padding included) summed
    over every segment of the run (each time the command ran), with `segment_history` listing them."""
    t = self.config.train
    segment = {
      "start": start,
      "step": step,
      "tokens": (step - start) * t.global_batch_size * self.config.data.seq_len,
      "wall_time_s": time.perf_counter() - self.started,
      **self.timings,
    }
    segments = self._earlier_segments(start) + [segment]
    summary = {
      **last,
      "step": step,
      "stop_reason": self.stop_reason,
      "mfu_peak": self.peak.label,
      **{key: sum(s[key] for s in segments) for key in ("wall_time_s", *self.timings)},
      "tokens_trained": sum(s["tokens"] for s in segments),
      "segments": len(segments),
      "segment_history": segments,
    }
    if validations:
      best_step = min(validations, key=validations.get)
      summary.update(
        final_val_loss=validations[max(validations)], best_val_loss=validations[best_step], best_val_step=best_step
      )
    return summary

  def logits(self, batch: dict, params=None) -> jax.Array:
    """The model's logits on `batch`, with dropout off, under the run's mesh and logical rules (from a callback).

    Args:
      batch: this process's rows of a global batch, a dict of B x T arrays with the data's keys (for the
        decoder: inputs, segment_ids, positions; targets and weights are ignored). B must divide over the
        mesh's data axes.
      params: the parameters to use; default the current ones (`trainer.state.params`).

    Returns:
      The global logits, B x T x V (sharded as the batch is).
    """
    if self._logits_fn is None:
      self._logits_fn = train_step.make_logits_fn(self.setup, self.setup.state_shardings.params)
    params = self.state.params if params is None else params
    return self._logits_fn(params, sharding.global_batch(batch, self.setup.batch_sharding))


def train(config: Config, workdir: str | Path, **kwargs) -> dict[str, float]:
  """Trains per the whole `config` in `workdir` (resuming a run there); returns the last logged metrics.

  Keyword arguments go to `Trainer`: model, train_data, eval_data, loss_fn, tokenizer, callbacks.
  """
  return Trainer(config, workdir, **kwargs).run()
