"""`jaxlm quantize`'s report: float against int8 weights of one run, side by side.

Kept apart from `quantize` (the int8 scheme and int8 run directories) because
it reloads runs through `jaxlm.loader`, which itself reads int8 runs.
"""

from __future__ import annotations

import json
import math
import os

import jax

from jaxlm.data import pipeline as data_lib
from jaxlm.storage import fs
from jaxlm import loader
from jaxlm.models import quantize
from jaxlm.training import trainer, step as train_step


def score(run, params, batches) -> tuple[float, float]:
  """(summed negative log-likelihood, tokens) of `params` (float or int8) over `batches`."""
  sums = jax.jit(lambda p, batch: train_step.batch_sums(run.model, quantize.materialize(p), batch, run.config.train))
  nll = tokens = 0.0
  for batch in batches:
    out = sums(params, batch)
    nll, tokens = nll + float(out["nll_sum"]), tokens + float(out["weight_sum"])
  return nll, tokens


def compare(workdir, step: int | None = None, max_batches: int | None = None, out=None) -> dict:
  """Quantizes a run to int8, writes the int8 run to `out` (default `workdir/int8`) and reports, side by
  side, the weight memory and validation perplexity of float and int8 weights.

  The float perplexity is taken from `workdir/eval_step_N.json` when `jaxlm eval` scored the same number
  of tokens of the same step there (`float_source` says which); otherwise the float weights are scored too.
  The report is also written to `workdir/quantize_step_N.json`.
  """
  if quantize.is_int8_run(workdir):
    raise quantize.QuantizeError(f"{workdir} is already an int8 run (written by `jaxlm quantize`); pass the float run")
  run = loader.load(workdir, step)
  int8 = quantize.quantize_params(run.params)
  out = fs.join(workdir, "int8") if out is None else os.fspath(out)
  quantize.write_int8_run(run, int8, out, workdir)
  rows = trainer.prepare_data(run.config, run.tokenizer, "validation")
  limit = run.config.eval.max_batches if max_batches is None else max_batches
  batches = list(data_lib.eval_batches(rows, run.config.eval.batch_size, limit))
  int8_nll, tokens = score(run, int8, batches)
  eval_path = fs.path(fs.join(workdir, f"eval_step_{run.step}.json"))
  evaluated = json.loads(eval_path.read_text()) if eval_path.exists() else {}
  if evaluated.get("step") == run.step and evaluated.get("tokens") == tokens:
    float_loss, source = evaluated["loss"], eval_path.name
  else:
    float_loss, source = score(run, run.params, batches)[0] / max(tokens, 1.0), "scored"
  ppl = {"float": math.exp(min(float_loss, 700)), "int8": math.exp(min(int8_nll / max(tokens, 1.0), 700))}
  float_bytes, int8_bytes = quantize.nbytes(run.params), quantize.nbytes(int8)
  result = {"step": run.step, "tokens": tokens, "float_mb": float_bytes / 2**20, "int8_mb": int8_bytes / 2**20,
            "memory_reduction": float_bytes / int8_bytes, "float_perplexity": ppl["float"],
            "int8_perplexity": ppl["int8"], "perplexity_change": ppl["int8"] / ppl["float"] - 1,
            "float_source": source, "int8_run": out}
  fs.write_text(fs.join(workdir, f"quantize_step_{run.step}.json"), json.dumps(result, indent=2))
  return result
