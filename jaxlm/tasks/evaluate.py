"""`jaxlm eval`: reload a run (`jaxlm.loader.load`) and score its validation split.

The loss sums are the same for every family; what is reported beside them (bits
per byte against gzip and xz, BLEU, MLM accuracy against the unigram baseline)
is the family's `evaluate` in `jaxlm.families`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax

from jaxlm import config as config_lib
from jaxlm.config import Config
from jaxlm.data import pipeline as data_lib
from jaxlm import families, loader
from jaxlm.storage import fs
from jaxlm.models import quantize
from jaxlm.parallel import sharding
from jaxlm.training import step as train_step, trainer


def fitted_config(config: Config, num_devices: int) -> Config:
  """A copy of the whole `config` whose mesh fits `num_devices` (the run's, else all devices on `data`)
  and whose eval batch size divides over the data-parallel devices; `config` itself is not changed."""
  config = config.copy_and_resolve_references()
  try:
    config_lib.mesh_shape(config, num_devices)
  except config_lib.ConfigError:
    trainer.log(f"the run's mesh does not fit {num_devices} devices; evaluating with mesh data={num_devices}")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  dp = config_lib.data_parallel_size(config, num_devices)
  config.eval.batch_size = -(-config.eval.batch_size // dp) * dp
  return config


@dataclasses.dataclass
class Evaluation:
  """What a family's `evaluate` gets: the loaded run, its validation rows and a way to sum the loss.

  config: the whole config, fitted to these devices (`fitted_config`). run: the `loader.Run`.
  rows: the family's validation rows. max_batches: the batches to score (0: all).
  """
  config: Config
  run: loader.Run
  rows: Any
  max_batches: int
  eval_step: Callable
  batch_sharding: Any

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

  def loss_sums(self, on_batch: Callable[[dict], None] | None = None) -> dict[str, float]:
    """{'loss_sum', 'nll_sum', 'weight_sum', 'correct_sum'} over the scored batches; `on_batch(local)` sees
    each process-local batch first (for sums the loss does not give, such as bytes)."""
    batches = data_lib.eval_batches(self.rows, self.config.eval.batch_size, self.max_batches)
    if on_batch is not None:
      batches = _tap(batches, on_batch)
    return trainer.evaluate_loss(self.eval_step, self.params, batches, self.batch_sharding)


def _tap(batches, on_batch):
  for local in batches:
    on_batch(local)
    yield local


def evaluate(workdir: str | Path, step: int | None = None, max_batches: int | None = None) -> dict:
  """Scores checkpoint `step` (default: the latest) of the run in `workdir` on its validation split.

  Returns the family's metrics (for the decoder: step, tokens, loss, perplexity, accuracy, bits_per_byte and
  the gzip/xz baselines) and writes them to `workdir/eval_step_{step}.json`.
  """
  workdir = fs.path(workdir)  # a local folder or gs://
  config = fitted_config(loader.load_config(workdir), jax.device_count())
  mesh = sharding.make_mesh(config)
  run = loader.load(workdir, step, mesh)
  run = run._replace(params=quantize.materialize(run.params))  # an int8 run (`jaxlm quantize`) scores dequantized
  family = families.get(config.model.family)
  rules = config_lib.mesh_rules(config)
  shardings = jax.tree.map(lambda x: x.sharding, run.params)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  eval_step = train_step.eval_step_for(run.model, train_step.cross_entropy_loss(config.train), mesh, rules,
                                       shardings, batch_sharding)
  rows = family.rows(config, run.tokenizer, "validation")
  limit = config.eval.max_batches if max_batches is None else max_batches
  result = family.evaluate(Evaluation(config, run, rows, limit, eval_step, batch_sharding))
  if jax.process_index() == 0:
    (workdir / f"eval_step_{result['step']}.json").write_text(json.dumps(result, indent=2))
  return result
