"""`jaxlm eval` and `jaxlm quantize`'s report: reload a run (`jaxlm.loader.load`) and score its validation split.

The loss sums (`jaxlm.training.step.evaluate_loss`, which training validation
uses too) and the metrics made from them (`Evaluation.loss_metrics`) are the
same for every family; what is reported beside them (bits per byte against gzip
and xz, BLEU, MLM accuracy against the unigram baseline) is the family's
`evaluate` in `jaxlm.families`. `compare_int8` scores the same batches with the
run's weights quantized to int8 (`jaxlm.models.quantize`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from jaxlm import config as config_lib
from jaxlm import families, loader
from jaxlm.config import Config
from jaxlm.data import pipeline as data_lib
from jaxlm.models import quantize
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.storage import fs
from jaxlm.training import step as train_step
from jaxlm.training import trainer

# Result keys that hold text for people (a summary line, a table): `jaxlm eval` prints them as text after the
# JSON of the numbers, never escaped inside it.
TEXT_KEYS = ("summary", "per_class_table")
PROGRESS_EVERY_S = 10.0  # a progress line at least this often while batches are scored


@dataclasses.dataclass
class Evaluation:
  """What a family's `evaluate` gets: the loaded run, its validation rows and a way to sum the loss.

  config: the whole config, fitted to these devices (`jaxlm.parallel.mesh.fit_mesh`). run: the `loader.Run`.
  rows: the family's validation rows. max_batches: the batches to score (0: all). workdir: the run's folder,
  where a family may write files beside the report (QA's predictions.json); None writes none.
  """

  config: Config
  run: loader.Run
  rows: Any
  max_batches: int
  eval_step: Callable
  batch_sharding: Any
  workdir: Any = None

  @property
  def params(self):
    """The run's parameter tree, sharded on the evaluation mesh."""
    return self.run.params

  @property
  def tokenizer(self):
    """The run's tokenizer."""
    return self.run.tokenizer

  @property
  def step(self) -> int:
    """The checkpoint step evaluated."""
    return self.run.step

  @staticmethod
  def log(message: str) -> None:
    """A progress line on stderr (process 0), above any bar."""
    trainer.log(message)

  @property
  def num_batches(self) -> int:
    """The validation batches scored: all of the split's (the last one padded), or `max_batches` of them."""
    count = -(-len(self.rows) // self.config.eval.batch_size)
    return min(count, self.max_batches) if self.max_batches else count

  def batches(self) -> Iterator[dict]:
    """This process's validation batches in order, with a line saying how many and progress lines on stderr
    (the first after compilation, then every PROGRESS_EVERY_S seconds, and the last)."""
    size, total = self.config.eval.batch_size, self.num_batches
    whole = -(-len(self.rows) // size)
    limit = f"the first {total} of {whole} (max_batches={self.max_batches})" if total < whole else f"all {total}"
    trainer.log(f"eval: scoring {limit} validation batches of {size} rows")
    start = last = time.perf_counter()
    for done, local in enumerate(data_lib.eval_batches(self.rows, size, self.max_batches), 1):
      yield local
      now = time.perf_counter()
      if done in (1, total) or now - last >= PROGRESS_EVERY_S:
        trainer.log(f"eval: batch {done}/{total} ({now - start:.1f} s)")
        last = now

  def loss_sums(self, on_batch: Callable[[dict], None] | None = None) -> dict[str, float]:
    """{'loss_sum', 'nll_sum', 'weight_sum', 'correct_sum'} over the scored batches (`batches`); `on_batch(local)`
    sees each process-local batch first (for sums the loss does not give, such as bytes)."""
    batches = self.batches()
    if on_batch is not None:
      batches = _tap(batches, on_batch)
    return train_step.evaluate_loss(self.eval_step, self.params, batches, self.batch_sharding)

  def loss_metrics(self, totals: dict[str, float] | None = None) -> dict[str, float]:
    """The metrics of the loss sums that every family reports (each picks those it shows).

    Args:
      totals: `loss_sums()`'s answer; default: a new `loss_sums()`.

    Returns:
      {'step', 'batches', 'tokens' (the weight sum), 'loss' (NLL per weighted token), 'perplexity', 'accuracy'} and
      each extra term NAME_sum of the loss as NAME.
    """
    totals = self.loss_sums() if totals is None else totals
    weight = max(totals["weight_sum"], 1.0)
    loss = totals["nll_sum"] / weight
    return {
      "step": self.step,
      "batches": self.num_batches,
      "tokens": totals["weight_sum"],
      "loss": loss,
      "perplexity": math.exp(min(loss, 700)),
      "accuracy": totals["correct_sum"] / weight,
      **train_step.loss_terms(totals, weight),  # a loss's extra terms (`jaxlm.LossFn`), e.g. MoE's
    }


def _tap(batches, on_batch):
  for local in batches:
    on_batch(local)
    yield local


def load(workdir: str | Path, step: int | None = None, max_batches: int | None = None) -> Evaluation:
  """The `Evaluation` of checkpoint `step` (default: the latest) of the run in `workdir`, on all devices.

  Args:
    workdir: the run directory (a local folder or gs://).
    step: the checkpoint step; None: the latest.
    max_batches: the validation batches to score (0: all); None: the config's `eval.max_batches`.

  Returns:
    The run loaded on a mesh of all devices (an int8 run dequantized), its validation rows and eval step.
  """
  workdir = fs.path(workdir)  # a local folder or gs://
  saved, devices = loader.load_config(workdir), jax.device_count()
  config = mesh_lib.fit_mesh(saved, devices)
  if config.mesh.to_dict() != saved.mesh.to_dict():
    trainer.log(f"the run's mesh does not fit {devices} devices; evaluating with mesh data={devices}")
  mesh = mesh_lib.make_mesh(config)
  run = loader.load(workdir, step, mesh)
  run = run._replace(params=quantize.materialize(run.params))  # an int8 run (`jaxlm quantize`) scores dequantized
  family = families.get(config.model.family)
  rules = config_lib.mesh_rules(config)
  shardings = jax.tree.map(lambda x: x.sharding, run.params)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  eval_step = train_step.eval_step_for(
    run.model, train_step.cross_entropy_loss(config.train), mesh, rules, shardings, batch_sharding
  )
  rows = family.rows(config, run.tokenizer, "validation")
  limit = config.eval.max_batches if max_batches is None else max_batches
  return Evaluation(config, run, rows, limit, eval_step, batch_sharding, workdir)


def evaluate(workdir: str | Path, step: int | None = None, max_batches: int | None = None) -> dict:
  """Scores checkpoint `step` (default: the latest) of the run in `workdir` on its validation split.

  Args:
    workdir, step, max_batches: as `load`.

  Returns:
    The family's metrics (for the decoder: step, tokens, loss, perplexity, accuracy, bits_per_byte, the
    gzip/xz baselines and the summary line), also written to `workdir/eval_step_{step}.json`.
  """
  workdir = fs.path(workdir)  # a local folder or gs://
  evaluation = load(workdir, step, max_batches)
  result = families.get(evaluation.config.model.family).evaluate(evaluation)
  if jax.process_index() == 0:
    (workdir / f"eval_step_{result['step']}.json").write_text(json.dumps(result, indent=2))
  return result


def compare_int8(workdir, step: int | None = None, max_batches: int | None = None, out=None) -> dict:
  """Quantizes a run to int8, writes the int8 run and reports, side by side, the weight memory and
  validation perplexity of float and int8 weights (`jaxlm quantize`).

  The float perplexity is taken from `workdir/eval_step_N.json` when `jaxlm eval` scored the same number
  of tokens of the same step there (`float_source` says which); otherwise the float weights are scored too.

  Args:
    workdir: the float run's directory.
    step, max_batches: as `load`.
    out: where to write the int8 run; default `workdir/int8`.

  Returns:
    The report, also written to `workdir/quantize_step_N.json`.

  Raises:
    QuantizeError: `workdir` is an int8 run already, or `out` holds another run's checkpoints.
  """
  if quantize.is_int8_run(workdir):
    raise quantize.QuantizeError(f"{workdir} is already an int8 run (written by `jaxlm quantize`); pass the float run")
  evaluation = load(workdir, step, max_batches)
  run = evaluation.run
  int8 = quantize.quantize_params(run.params)
  out = fs.join(workdir, "int8") if out is None else os.fspath(out)
  quantize.write_int8_run(run, int8, out, workdir)
  # Scored dequantized, placed as the float weights the eval step was compiled for.
  int8_params = jax.device_put(quantize.materialize(int8), jax.tree.map(lambda x: x.sharding, run.params))
  int8_metrics = dataclasses.replace(evaluation, run=run._replace(params=int8_params)).loss_metrics()
  tokens = int8_metrics["tokens"]
  eval_path = fs.path(fs.join(workdir, f"eval_step_{run.step}.json"))
  evaluated = json.loads(eval_path.read_text()) if eval_path.exists() else {}
  if evaluated.get("step") == run.step and evaluated.get("tokens") == tokens:
    float_loss, source = evaluated["loss"], eval_path.name
  else:
    float_loss, source = evaluation.loss_metrics()["loss"], "scored"
  ppl = {"float": math.exp(min(float_loss, 700)), "int8": int8_metrics["perplexity"]}
  float_bytes, int8_bytes = quantize.nbytes(run.params), quantize.nbytes(int8)
  result = {
    "step": run.step,
    "tokens": tokens,
    "float_mb": float_bytes / 2**20,
    "int8_mb": int8_bytes / 2**20,
    "memory_reduction": float_bytes / int8_bytes,
    "float_perplexity": ppl["float"],
    "int8_perplexity": ppl["int8"],
    "perplexity_change": ppl["int8"] / ppl["float"] - 1,
    "float_source": source,
    "int8_run": out,
  }
  fs.write_text(fs.join(workdir, f"quantize_step_{run.step}.json"), json.dumps(result, indent=2))
  return result
