"""Subcommand bodies, and the one place where expected errors become one-line messages.

Expected errors (bad config, missing files, mismatched checkpoints) print one
line naming the key or file and the fix, and exit 2, instead of a traceback.
"""

from __future__ import annotations

import json
import sys

from jaxlm import checkpoint, config as config_lib


def _expected_errors():
  from jaxlm import evaluate, trainer  # local: keeps `jaxlm --help` fast
  return (config_lib.ConfigError, checkpoint.CheckpointError, evaluate.RunError, trainer.TrainingError,
          FileNotFoundError)


def run(args, overrides: list[str]) -> int:
  try:
    return COMMANDS[args.command](args, overrides)
  except _expected_errors() as e:
    print(f"jaxlm: error: {e}", file=sys.stderr)
    return 2


def _train(args, overrides) -> int:
  from jaxlm import trainer
  config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
  trainer.train(config, args.workdir)
  return 0


def _eval(args, overrides) -> int:
  from jaxlm import evaluate
  result = evaluate.evaluate(args.workdir, args.step, args.max_batches)
  print(json.dumps(result, indent=2))
  if "summary" in result:  # the encoder and encoder-decoder families report against their own baselines
    print(result["summary"])
    return 0
  print(f"step {result['step']}: validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, "
        f"{result['bits_per_byte']:.3f} bits/byte (gzip -9: {result['gzip-9_bits_per_byte']:.3f}, "
        f"xz -9: {result['xz-9_bits_per_byte']:.3f})")
  return 0


COMMANDS = {"train": _train, "eval": _eval}
