"""Subcommand bodies, and the one place where expected errors become one-line messages.

Expected errors (bad config, missing files, mismatched checkpoints) print one
line naming the key or file and the fix, and exit 2, instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time

from jaxlm import config as config_lib
from jaxlm.errors import JaxlmError

# What the command reports in one line (exit 2) instead of a traceback.
EXPECTED_ERRORS = (JaxlmError, FileNotFoundError)


def _holds_threads(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised while handling, left threads that would hold the exit."""
  seen = 0
  while error is not None and seen < 100:
    if getattr(error, "holds_threads", False):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def run(args, overrides: list[str]) -> int:
  """Runs subcommand `args.command` (parsed by `jaxlm.cli.main`); returns the exit status (2: an expected error)."""
  try:
    return COMMANDS[args.command](args, overrides)
  except EXPECTED_ERRORS as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    if _holds_threads(e):  # e.g. Orbax's writers, waiting on a save that cannot finish
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)
    return 2
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    # A full disk fails every later write too (logs closing after a failed save): report the first failure.
    first = (
      e.__context__ if isinstance(e.__context__, EXPECTED_ERRORS) else f"writing {e.filename or 'a file'}: {e.strerror}"
    )
    print(f"jaxlm: error: {first}", file=sys.stderr)
    return 2


def _train(args, overrides) -> int:
  """Exit status 0 when training reached train.num_steps; 130 (SIGINT), 143 (SIGTERM) or 75
  (train.stop_at_step) when it stopped early after saving: see `run_report.EXIT_STATUS`."""
  from jaxlm.training import init_from, trainer
  from jaxlm.training import report as run_report

  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  if config.train.init_from:
    init_from.check_overrides(config, overrides)
  changed = run_report.overrides_that_differ(args.config, overrides, config)
  origin = args.config + (f" with {', '.join(changed)}" if changed else "")
  summary = trainer.train(config, args.workdir, origin=origin)
  return run_report.EXIT_STATUS[summary["stop_reason"]]


def _eval(args, overrides) -> int:
  if args.tasks:
    from jaxlm.tasks import harness

    options = {"include_path": args.include_path, "batch_size": args.batch_size, "limit": args.limit}
    harness.run_tasks(args.workdir, args.tasks.split(","), args.step, num_fewshot=args.num_fewshot, **options)
    return 0
  from jaxlm.tasks import evaluate

  result = evaluate.evaluate(args.workdir, args.step, args.max_batches)
  # The summary line and any table print as text, once, not escaped inside the JSON (eval_step_N.json has all).
  print(json.dumps({key: value for key, value in result.items() if key not in evaluate.TEXT_KEYS}, indent=2))
  for key in evaluate.TEXT_KEYS:  # the family's line against its baselines first
    if key in result:
      print(result[key])
  return 0


def _mesh(args):
  """The mesh of the --mesh flag (None without it: one device)."""
  from jaxlm.parallel import mesh as mesh_lib

  return mesh_lib.mesh_of_sizes(args.mesh) if getattr(args, "mesh", None) else None


def _load(args):
  from jaxlm import loader
  from jaxlm.models import quantize

  run = loader.load(args.workdir, args.step, _mesh(args))
  return run._replace(params=quantize.quantize_params(run.params)) if getattr(args, "int8", False) else run


def _generate(args, overrides) -> int:
  from jaxlm.inference import decode
  from jaxlm.inference import text as text_lib
  from jaxlm.storage import fs

  run = _load(args)
  text = fs.path(args.prompt_file).read_text() if args.prompt_file else args.prompt  # local or gs://
  tok, model = run.tokenizer, run.config.model
  mesh, rules = _mesh(args), config_lib.mesh_rules(run.config)
  adapter = decode.adapter_for(model, tok.bos_id)
  ids = adapter.prompt_ids(tok, text)
  stop = [] if args.ignore_eos else [tok.eos_id]
  if args.echo and adapter.prompt_in_cache:  # the output continues the prompt (an encoder's is a source)
    print(text, end="", flush=True)
  start = time.perf_counter()
  if args.beam_size:
    with decode.on_mesh(mesh, rules):  # the searcher's prefill and step trace under it
      result = decode.beam_search(
        model, run.params, [ids], args.beam_size, args.max_tokens, tok.eos_id, args.length_penalty, start_id=tok.bos_id
      )
    print(tok.decode(result.tokens[0]), flush=True)
    _print_speed(len(result.tokens[0]), start, None)
    return 0
  generator = decode.Generator(model, run.params, start_id=tok.bos_id, mesh=mesh, rules=rules)
  sampling = decode.Sampling(args.temperature, args.top_k, args.top_p, args.seed)
  output, first = text_lib.TextStream(tok), None
  for out in generator.stream([ids], args.max_tokens, sampling, stop):
    first = first or time.perf_counter()
    if out.emit_B[0]:
      print(output.push(int(out.tokens_B[0])), end="", flush=True)
  print(output.push(last=True), flush=True)
  _print_speed(len(output.tokens), start, first)
  return 0


def _print_speed(new_tokens: int, start: float, first: float | None) -> None:
  """Tokens/s to stderr (stdout stays the text): after the first token, whose wait includes compilation."""
  end = time.perf_counter()
  if first is None or new_tokens < 2:
    print(f"{new_tokens} tokens in {end - start:.2f} s, compilation included", file=sys.stderr)
    return
  print(
    f"{new_tokens} tokens: {(new_tokens - 1) / max(end - first, 1e-9):.1f} tokens/s after the first, which "
    f"took {first - start:.2f} s (compilation included)",
    file=sys.stderr,
  )


def _chat(args, overrides) -> int:
  from jaxlm.inference import chat, decode

  session = chat.ChatSession(
    _load(args), args.max_tokens, decode.Sampling(args.temperature, args.top_k, args.top_p, args.seed), args.system
  )
  chat.run_loop(session)
  return 0


def _serve(args, overrides) -> int:
  from jaxlm.inference import server as serve

  timeouts = {"header_timeout": args.header_timeout, "body_timeout": args.body_timeout}
  given = {name: seconds for name, seconds in timeouts.items() if seconds is not None}  # else the server's defaults
  serve.serve(
    args.workdir,
    args.host,
    args.port,
    args.step,
    args.int8,
    args.max_batch,
    _mesh(args),
    batching_policy=args.batching,
    **given,
  )
  return 0


def _convert(args, overrides) -> int:
  from jaxlm import hf

  if args.from_hf:
    if not args.workdir:
      raise hf.ConvertError("convert --from-hf needs --workdir RUN: the run directory to write")
    from jaxlm.data import tokenizer as tokenizer_lib

    run = hf.import_run(args.from_hf, args.workdir)
    kind = type(tokenizer_lib.load(run)).__name__
    print(f"wrote run {run} (checkpoint step 0, {kind})")
  else:
    if not args.out:
      raise hf.ConvertError("convert --to-hf needs --out DIR: where to write config.json and model.safetensors")
    print(f"wrote {hf.export_run(args.to_hf, args.out, args.step)}")
  return 0


def _export(args, overrides) -> int:
  from jaxlm.inference import export

  run = _load(args)
  out = export.export_run(run, args.out, args.batch_size, args.max_prompt_len, _mesh(args))
  print(f"wrote {out} (step {run.step}); load it with jaxlm.inference.export.load('{out}')")
  return 0


def _quantize(args, overrides) -> int:
  from jaxlm.tasks import evaluate

  result = evaluate.compare_int8(args.workdir, args.step, args.max_batches, args.out)
  print(json.dumps(result, indent=2))
  print(
    f"int8 weights: {result['float_mb']:.2f} MB -> {result['int8_mb']:.2f} MB "
    f"({result['memory_reduction']:.2f}x smaller); validation perplexity {result['float_perplexity']:.4f} -> "
    f"{result['int8_perplexity']:.4f} ({100 * result['perplexity_change']:+.2f}%)"
  )
  print(f"wrote the int8 run {result['int8_run']}: generate, serve and export take --workdir {result['int8_run']}")
  return 0


def _compile(args, overrides) -> int:
  """Exit status 0 when the step fits the slice's HBM (--plan: when a plan does), 1 when it does not."""
  from pathlib import Path

  from jaxlm.training import aot

  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  if args.json:
    aot.check_report_path(args.json)  # before minutes of compiling
  if args.plan:
    from jaxlm.training import plan

    report = plan.plan(config, args.topology, args.plan_compiles, log=lambda line: print(line, flush=True))
    print(plan.format_plan(report), flush=True)
    report["fits"] = report["picked"] is not None
  elif args.decode:
    report = aot.compile_decode(config, args.topology, args.batch_size, args.prompt_len)
    print(aot.format_decode_report(report), flush=True)
  else:
    report = aot.compile_train_step(config, args.topology)
    print(aot.format_report(report), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  return 0 if report["fits"] else 1


def _devices(args, overrides) -> int:
  """Exit status 0, or 1 when the config's mesh does not fit the devices here."""
  from pathlib import Path

  from jaxlm.cli import devices

  config = config_lib.load_config_file(args.config) if args.config else config_lib.base_config()
  config = config_lib.apply_overrides(config, overrides)
  report = devices.report(config, args.config or "the defaults")
  print(devices.format_report(report), flush=True)
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  return 1 if "mesh_error" in report else 0


def _verify(args, overrides) -> int:
  """Exit status 0 when every checked step is intact, 1 when any is damaged."""
  from jaxlm.training import verify

  results = verify.verify_run(args.workdir, args.step)
  print(verify.format_table(results), flush=True)
  return 1 if any(r["status"] == "DAMAGED" for r in results) else 0


def _config(args, overrides) -> int:
  from jaxlm.config import show as config_show

  from_file = config_lib.load_config_file(args.config)
  config = config_lib.apply_overrides(from_file.copy_and_resolve_references(), overrides)
  print(config_show.format_table(config, args.config, from_file))
  return 0


def _prepare(args, overrides) -> int:
  import time

  from jaxlm.data import prepare

  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  start = time.perf_counter()
  splits = [args.split] if args.split else ["train", "validation"]
  for split, index in prepare.prepare(config, args.out, splits, args.workers, args.shard_mb).items():
    print(
      f"{args.out}/{split}: {index['num_documents']:,} documents, {index['num_tokens']:,} tokens, "
      f"{index['num_bytes'] / 1e6:,.1f} MB of text in {len(index['shards'])} shards"
    )
  print(
    f"prepared in {time.perf_counter() - start:.1f} s; train with --config.data.source=prepared "
    f"--config.data.prepared_dir={args.out}"
  )
  return 0


def _plot(args, overrides) -> int:
  from jaxlm.training import plot

  print(f"wrote {plot.write_plot(args.runs, args.out)} ({len(args.runs)} run{'s' * (len(args.runs) > 1)})")
  return 0


COMMANDS = {
  "train": _train,
  "plot": _plot,
  "eval": _eval,
  "generate": _generate,
  "chat": _chat,
  "serve": _serve,
  "convert": _convert,
  "export": _export,
  "quantize": _quantize,
  "compile": _compile,
  "verify": _verify,
  "devices": _devices,
  "config": _config,
  "prepare": _prepare,
}
