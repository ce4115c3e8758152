"""A decoder run as a model of EleutherAI's lm-evaluation-harness (`lm_eval`), and `jaxlm eval --tasks`.

`harness_model(run)` is an `lm_eval.api.model.LM`: its `loglikelihood` and `loglikelihood_rolling` are
`jaxlm.inference.score`'s (every text read after one EOS, as `jaxlm generate` reads a prompt; long texts in
windows with context), and `generate_until` decodes greedily with `jaxlm.inference.decode.Generator`, then
cuts the text at the first stop string. Requests are batched (`batch_size` rows at once).

The harness is an optional extra: `pip install 'jaxlm[eval]'`. This module imports `lm_eval` only when
called, so jaxlm works without it, and a missing harness is one line naming the extra.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Sequence

from jaxlm.errors import JaxlmError
from jaxlm.inference import decode
from jaxlm.inference import score as score_lib
from jaxlm.storage import fs

INSTALL = "pip install 'jaxlm[eval]'"
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default, so few-shot examples are the ones it would pick


class HarnessError(JaxlmError, RuntimeError):
  """The harness is missing, or a task it was asked for is unknown; one line, with the fix."""


def require_lm_eval():
  """The `lm_eval` module, or HarnessError naming the extra to install.

  Returns:
    The imported `lm_eval` package.
  """
  try:
    import lm_eval
  except ImportError:
    raise HarnessError(f"the lm-evaluation-harness (lm_eval) is not installed; {INSTALL}") from None
  return lm_eval


@functools.cache
def model_class():
  """The `lm_eval.api.model.LM` subclass that wraps a run (defined on first use, once `lm_eval` imports).

  Returns:
    The class `JaxlmLM(run, batch_size=8)`.
  """
  require_lm_eval()
  from lm_eval.api.model import LM

  class JaxlmLM(LM):
    """A loaded decoder run (`jaxlm.loader.Run`) answering the harness's three kinds of request."""

    def __init__(self, run, batch_size: int = 8):
      super().__init__()
      score_lib.check_decoder(run)
      self.run, self.batch_size = run, int(batch_size)

    @property
    def tokenizer_name(self) -> str:
      """The tokenizer's class name, which the harness records (and keys its request cache by)."""
      return type(self.run.tokenizer).__name__

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
      """(log P(continuation | context), greedy) per request; `Instance.args` is (context, continuation)."""
      return score_lib.loglikelihood(self.run, [request.args for request in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
      """log P(text) per request, every token scored (`Instance.args` is (text,))."""
      scored = score_lib.score(self.run, [request.args[0] for request in requests], self.batch_size)
      return [float(s.logprobs.sum()) for s in scored]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
      """Greedy continuations, cut at the first of `until`; `Instance.args` is (context, gen_kwargs)."""
      return generate_until(self.run, [request.args for request in requests], self.batch_size)

  return JaxlmLM


def harness_model(run, batch_size: int = 8):
  """`run` as an lm-evaluation-harness model (`lm_eval.api.model.LM`).

  Args:
    run: a decoder `jaxlm.loader.Run`.
    batch_size: rows scored or decoded together.

  Returns:
    The model, for `lm_eval.simple_evaluate(model=...)`.

  Raises:
    HarnessError: lm_eval is not installed. ScoreError: the run is not a decoder.
  """
  return model_class()(run, batch_size)


def generate_until(run, requests: Sequence[tuple[str, dict]], batch_size: int = 8) -> list[str]:
  """Greedy continuations of each context, cut before the first stop string of its `until`.

  Args:
    run: a decoder `jaxlm.loader.Run`.
    requests: (context, gen_kwargs) pairs; gen_kwargs may hold `until` (a string or list of strings) and
      `max_gen_toks` (default 256, at most model.max_len - 1; the context keeps its last tokens to fit).
    batch_size: contexts decoded together.

  Returns:
    The text generated for each request.
  """
  tokenizer, max_len = run.tokenizer, run.config.model.max_len
  generator = decode.Generator(run.config.model, run.params, start_id=tokenizer.bos_id)
  texts = [""] * len(requests)
  by_limit: dict[int, list[int]] = {}
  for index, (_, options) in enumerate(requests):
    by_limit.setdefault(min(int(options.get("max_gen_toks", 256)), max_len - 1), []).append(index)
  for max_new, indices in by_limit.items():
    for begin in range(0, len(indices), batch_size):
      chunk = indices[begin : begin + batch_size]
      prompts = [[tokenizer.eos_id, *tokenizer.encode(requests[i][0])][-(max_len - max_new) :] for i in chunk]
      for index, tokens in zip(chunk, generator.generate(prompts, max_new, stop_ids=[tokenizer.eos_id])):
        texts[index] = _cut(tokenizer.decode(tokens), requests[index][1].get("until", []))
  return texts


def _cut(text: str, until) -> str:
  stops = [until] if isinstance(until, str) else list(until or [])
  ends = [text.find(stop) for stop in stops if stop and stop in text]
  return text[: min(ends)] if ends else text


def evaluate(
  run,
  tasks: Sequence[str],
  include_path: str | None = None,
  batch_size: int = 8,
  limit: float | None = None,
  num_fewshot: int | None = None,
  log_samples: bool = False,
) -> dict:
  """Runs harness tasks on a loaded run.

  Args:
    run: a decoder `jaxlm.loader.Run`.
    tasks: task names (or groups) the harness knows.
    include_path: a folder of task YAML files; then only its tasks are indexed (the harness's ~14,000
      built-in ones take 20+ s to index), else the built-in tasks.
    batch_size: rows scored or decoded together.
    limit: examples per task (a fraction below 1); None: all.
    num_fewshot: few-shot examples; None: each task's own.
    log_samples: keep every request and its answer under 'samples'.

  Returns:
    `lm_eval.evaluate`'s results dict ('results', 'configs', ... and 'samples' when asked).

  Raises:
    HarnessError: lm_eval is missing, or a task name is unknown.
  """
  require_lm_eval()
  from lm_eval.evaluator import evaluate as harness_evaluate
  from lm_eval.tasks import TaskManager

  manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
  unknown = [name for name in tasks if name not in manager.all_tasks]
  if unknown:
    where = f"in --include-path {include_path}" if include_path else "among the harness's tasks"
    raise HarnessError(f"task {unknown[0]!r} not found {where}; name a task its YAML defines (`task: NAME`)")
  loaded = manager.load(list(tasks))
  for task in loaded["tasks"].values():  # as `lm_eval.simple_evaluate` sets them
    if num_fewshot is not None:
      task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
      task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
  # `lm_eval.evaluate`, not `simple_evaluate`: the latter also imports torch, when installed, to describe the
  # machine (15 s, running `pip list`), which says nothing about a JAX model.
  return harness_evaluate(
    lm=harness_model(run, batch_size), task_dict=loaded, limit=limit, log_samples=log_samples, bootstrap_iters=0
  )


def run_tasks(workdir, tasks: Sequence[str], step: int | None = None, **options) -> dict:
  """`jaxlm eval --tasks`: loads the run, runs the harness tasks, writes `workdir/harness_step_N.json` and
  prints the harness's table.

  Args:
    workdir: the run directory.
    tasks: task names.
    step: the checkpoint; None: the latest.
    **options: as `evaluate` (include_path, batch_size, limit, num_fewshot).

  Returns:
    {task: {metric: value}} of the harness's results, with 'step'.
  """
  require_lm_eval()
  from lm_eval.utils import make_table

  from jaxlm import loader

  run = loader.load(workdir, step)
  score_lib.check_decoder(run)  # before the harness indexes its tasks
  results = evaluate(run, tasks, **options)
  print(make_table(results), flush=True)
  summary = {"step": run.step, **{task: dict(metrics) for task, metrics in results["results"].items()}}
  fs.write_text(fs.join(workdir, f"harness_step_{run.step}.json"), json.dumps(summary, indent=2, default=str))
  print(f"wrote {fs.join(workdir, f'harness_step_{run.step}.json')}", file=sys.stderr)
  return summary
