"""The `jaxlm` command: train, eval, generate, serve, convert, export, quantize.

Usage:
  jaxlm train --config configs/default.py --workdir runs/x [--config.model.num_layers=4 ...]
  jaxlm eval --workdir runs/x [--step N]  |  jaxlm eval --workdir runs/x --tasks T1,T2 [--include-path DIR]
  jaxlm generate --workdir runs/x --prompt "def " [--max-tokens 64 --temperature 0.8 --top-p 0.9 --seed 0]
  jaxlm chat --workdir runs/x [--system "Be terse." --max-tokens 256]
  jaxlm serve --workdir runs/x --port 8000
  jaxlm convert --from-hf HF_DIR --workdir runs/x  |  jaxlm convert --to-hf runs/x --out HF_DIR
  jaxlm export --workdir runs/x --out export/x
  jaxlm quantize --workdir runs/x
  jaxlm plot runs/x [runs/y ...] --out loss.png
  jaxlm verify --workdir runs/x [--step N]
  jaxlm config show configs/default.py [--config.model.num_layers=4 ...]
  jaxlm compile --config configs/llama_7b.py --topology v5p-32 [--config.mesh.fsdp=-1 ...] [--json out.json]
  jaxlm devices [--config configs/gpt2_small.py --config.mesh.fsdp=-1 ...] [--json devices.json]
  jaxlm prepare --config configs/default.py --out data/x [--config.data.source=files --config.data.paths='c/*.txt']
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxlm import runtime
from jaxlm.cli import commands

WORKDIR_HELP = "the run directory (a local folder or gs://BUCKET/PATH): config.json, checkpoints/, metrics.jsonl"


class HelpWithDefaults(argparse.HelpFormatter):
  """Adds '(default: X)' to each option's help that has a default worth saying and does not say it already."""

  def _get_help_string(self, action):
    text = action.help or ""
    unsaid = action.default is None or action.default is argparse.SUPPRESS or "default" in text
    if unsaid or action.nargs == 0 or not action.option_strings:  # a flag (--int8) has no default to show
      return text
    return f"{text} (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
  """The `jaxlm` argument parser: one subparser per subcommand."""
  p = argparse.ArgumentParser(prog="jaxlm", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  add_parser = sub.add_parser
  sub.add_parser = lambda *args, **kwargs: add_parser(*args, formatter_class=HelpWithDefaults, **kwargs)
  train = sub.add_parser(
    "train",
    help="train a model; resumes from the latest intact checkpoint in --workdir",
    epilog="Any config key can be overridden with --config.KEY=VALUE (with '='), e.g. "
    "--config.model.num_layers=6 --config.optim.learning_rate=3e-4. "
    "`jaxlm config show CONFIG` lists every key with its default, allowed values and "
    "comment.",
  )
  train.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  train.add_argument("--workdir", required=True, help=WORKDIR_HELP + "; an existing run there is resumed")
  evaluate = sub.add_parser(
    "eval",
    help="evaluate a checkpoint on the validation split, or on lm-evaluation-harness tasks (--tasks)",
  )
  evaluate.add_argument("--workdir", required=True, help=WORKDIR_HELP)
  evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  evaluate.add_argument("--max-batches", type=int, default=None, help="limit the batches scored (default: config)")
  harness = evaluate.add_argument_group(
    "lm-evaluation-harness (a decoder run; needs pip install 'jaxlm[eval]'; docs/tasks.md)"
  )
  harness.add_argument("--tasks", default="", help="comma-separated harness task names: run them instead")
  harness.add_argument("--include-path", default=None, help="a folder of task YAML files (then only its tasks)")
  harness.add_argument("--limit", type=float, default=None, help="examples per task (a fraction below 1)")
  harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
  harness.add_argument("--batch-size", type=int, default=8, help="rows scored or decoded together")
  _deployment_parsers(sub)
  plot = sub.add_parser(
    "plot",
    help="loss, learning rate, gradient norm and tokens/s of runs, overlaid, as a PNG "
    "(needs matplotlib: pip install -e '.[plot]' in the jaxlm checkout)",
  )
  plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories (their metrics.jsonl)")
  plot.add_argument("--out", default="loss.png", help="the image to write (default: loss.png)")
  compile_ = sub.add_parser(
    "compile",
    help="compile the train step for a TPU slice on any machine: memory per chip, "
    "fits or not, estimated MFU (needs libtpu: pip install -e '.[aot]')",
  )
  compile_.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  compile_.add_argument(
    "--topology", required=True, help="a TPU slice: v5e-16 (or v5litepod-16), v5p-32, v4-8, v6e-8, or v5e:4x4"
  )
  compile_.add_argument("--json", default="", help="also write the report to this JSON file")
  compile_.add_argument("--decode", action="store_true", help="compile prefill and the decode step instead of training")
  compile_.add_argument("--batch-size", type=int, default=8, help="--decode: rows decoded together")
  compile_.add_argument("--prompt-len", type=int, default=0, help="--decode: prompt tokens (default: half the context)")
  compile_.add_argument(
    "--plan",
    action="store_true",
    help="search mesh layout x remat policy x micro-batches for the fastest plan that fits; prints its --config flags",
  )
  compile_.add_argument("--plan-compiles", type=int, default=4, help="--plan: full compiles at most (minutes each)")
  devices = sub.add_parser(
    "devices",
    help="preflight: what JAX sees, the versions, memory and peak FLOP/s per device, and the kernels and mesh "
    "a config would get here",
  )
  devices.add_argument("--config", default=None, help="a configs/*.py file (default: the schema's defaults)")
  devices.add_argument("--json", default="", help="also write the report to this JSON file")
  verify = sub.add_parser("verify", help="check every checkpoint of a run against the checksums saved with it")
  verify.add_argument("--workdir", required=True, help=WORKDIR_HELP)
  verify.add_argument("--step", type=int, default=None, help="check this step only (default: all)")
  config_show = sub.add_parser(
    "config",
    help="`jaxlm config show CONFIG [--config.KEY=VALUE ...]`: every key, its value, type, allowed values and comment",
  )
  config_show.add_argument("action", choices=["show"])
  config_show.add_argument("config", metavar="CONFIG", help="a configs/*.py file with get_config()")
  prepare = sub.add_parser(
    "prepare",
    help="tokenize the config's data source once into token shards that "
    "--config.data.source=prepared reads (docs/data.md)",
  )
  prepare.add_argument("--config", required=True, help="a configs/*.py file with get_config(); its data.* keys")
  prepare.add_argument("--out", required=True, help="output folder: OUT/train and OUT/validation")
  prepare.add_argument("--split", choices=["train", "validation"], default=None, help="one split (default: both)")
  prepare.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per CPU)")
  prepare.add_argument("--shard-mb", type=float, default=16.0, help="source megabytes per shard")
  return p


def mesh_sizes(text: str) -> dict[str, int]:
  """The --mesh flag's 'data=2,tensor=4' as {'data': 2, 'fsdp': 1, 'tensor': 4} (axes left out are 1)."""
  from jaxlm.parallel import mesh as mesh_lib  # local: it loads jax, which `jaxlm --help` does not need

  sizes = dict.fromkeys(mesh_lib.AXES, 1)
  for item in text.split(","):
    name, _, value = item.partition("=")
    if name.strip() not in mesh_lib.AXES or not value.strip().isdigit() or int(value) < 1:
      raise argparse.ArgumentTypeError(
        f"'{item}' is not AXIS=SIZE with AXIS one of {', '.join(mesh_lib.AXES)} and SIZE >= 1; "
        "write e.g. --mesh data=2,tensor=4"
      )
    sizes[name.strip()] = int(value)
  return sizes


def _run_args(p, int8: bool = True, mesh: bool = False):
  p.add_argument("--workdir", required=True, help=WORKDIR_HELP)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  if int8:
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantized weights (see `jaxlm quantize`)")
  if mesh:
    p.add_argument(
      "--mesh",
      type=mesh_sizes,
      default=None,
      metavar="data=D,fsdp=F,expert=E,tensor=T",
      help="shard the params (by the run's mesh.rules) and the KV cache (batch x kv heads) over "
      "D*F*T devices; axes left out are 1 (default: one device)",
    )


def _deployment_parsers(sub):
  gen = sub.add_parser("generate", help="generate text from a run's checkpoint, streaming tokens as produced")
  _run_args(gen, mesh=True)
  source = gen.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="the text to continue")
  source.add_argument("--prompt-file", help="a text file (local or gs://) whose text to continue")
  gen.add_argument("--max-tokens", type=int, default=128, help="the most tokens to generate")
  gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  gen.add_argument("--top-k", type=int, default=0, help="0 disables")
  gen.add_argument("--top-p", type=float, default=1.0, help="1 disables")
  gen.add_argument("--seed", type=int, default=0, help="the sampling seed")
  gen.add_argument("--beam-size", type=int, default=0, help="beam search with this width (no streaming)")
  gen.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha for beam search")
  gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
  gen.add_argument(
    "--no-echo", dest="echo", action="store_false", help="print only the generated text, not the prompt before it"
  )
  chat = sub.add_parser("chat", help="talk to a run in the terminal with its chat template; keeps the conversation")
  _run_args(chat)
  chat.add_argument("--max-tokens", type=int, default=256, help="the most tokens per answer")
  chat.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  chat.add_argument("--top-k", type=int, default=0, help="0 disables")
  chat.add_argument("--top-p", type=float, default=1.0, help="1 disables")
  chat.add_argument("--seed", type=int, default=0, help="the sampling seed")
  chat.add_argument("--system", default="", help="a system message that opens the conversation")
  serve = sub.add_parser(
    "serve", help="HTTP completion server (POST /v1/completions, /v1/chat/completions, GET /health, /v1/models)"
  )
  _run_args(serve, mesh=True)
  serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
  serve.add_argument("--port", type=int, default=8000, help="the port to listen on")
  serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
  serve.add_argument(
    "--batching",
    choices=("continuous", "static"),
    default="continuous",
    help="continuous: requests join the decode batch between steps; static: a batch decodes to its end first",
  )
  serve.add_argument("--header-timeout", type=float, help="seconds a connection has to send a request's headers (15)")
  serve.add_argument("--body-timeout", type=float, help="seconds a request has to send its body (30)")
  convert = sub.add_parser(
    "convert", help="Hugging Face <-> jaxlm (GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM)"
  )
  direction = convert.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from-hf", metavar="HF_DIR", help="config.json + model.safetensors; needs --workdir")
  direction.add_argument("--to-hf", metavar="RUN", help="a run directory; needs --out")
  convert.add_argument("--workdir", help="--from-hf: the run directory to write")
  convert.add_argument("--out", help="--to-hf: the folder to write config.json and model.safetensors to")
  convert.add_argument("--step", type=int, default=None, help="--to-hf: checkpoint step (default: latest)")
  export = sub.add_parser("export", help="serialize prefill and decode step (StableHLO via jax.export) + weights")
  _run_args(export, mesh=True)
  export.add_argument("--out", required=True, help="the folder to write the artifact to")
  export.add_argument("--batch-size", type=int, default=1, help="rows the artifact decodes together")
  export.add_argument(
    "--max-prompt-len", type=int, default=0, help="prompt tokens the artifact takes (default: half the context)"
  )
  quantize = sub.add_parser(
    "quantize",
    help="int8 weight-only: writes an int8 run (for generate, serve, export) "
    "and reports memory and validation perplexity vs float",
  )
  _run_args(quantize, int8=False)
  quantize.add_argument("--max-batches", type=int, default=None, help="validation batches scored (default: config)")
  quantize.add_argument("--out", default=None, help="the int8 run directory to write (default: WORKDIR/int8)")


def main(argv: list[str] | None = None) -> int:
  """The `jaxlm` command on `argv` (default sys.argv[1:]); returns the exit status."""
  runtime.retain_freed_memory()
  args, rest = parser().parse_known_args(argv)
  runtime.skip_tpu_backend_without_tpu()  # before anything looks for devices: libtpu's start-up lines
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  spaced = [
    (key, value)
    for key, value in zip(rest, rest[1:])
    if key.startswith("--config.") and "=" not in key and value in unknown
  ]
  if spaced:
    key, value = spaced[0]
    print(f"jaxlm: error: write {key}={value} (with '='), not '{key} {value}'", file=sys.stderr)
    return 2
  if unknown:
    print(
      f"jaxlm: error: unrecognized arguments {' '.join(unknown)}; see `jaxlm {args.command} --help`", file=sys.stderr
    )
    return 2
  if getattr(args, "prompt_file", None) and not os.path.isfile(args.prompt_file):
    print(
      f"jaxlm: error: --prompt-file '{args.prompt_file}' not found; pass an existing text file, or --prompt TEXT",
      file=sys.stderr,
    )
    return 2
  if overrides and args.command not in ("train", "compile", "config", "prepare", "devices"):
    print(
      f"jaxlm: error: {args.command} uses the run's saved config; --config.* overrides apply to train and compile only",
      file=sys.stderr,
    )
    return 2
  if args.command == "train":  # a multi-process run trains in a child process (see jaxlm/parallel/supervisor.py)
    from jaxlm.parallel import supervisor

    launch = supervisor.launch_of(args.config, overrides, args.workdir)
    if launch:
      return supervisor.run([sys.executable, "-m", "jaxlm", *(sys.argv[1:] if argv is None else argv)], launch)
  return commands.run(args, overrides)


if __name__ == "__main__":
  sys.exit(main())
