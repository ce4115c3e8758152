"""The `jaxlm` command: train, eval (and the deployment commands as they land).

Usage:
  jaxlm train --config configs/default.py --workdir runs/x [--config.model.num_layers=4 ...]
  jaxlm eval --workdir runs/x [--step N]
"""

from __future__ import annotations

import argparse
import sys

from jaxlm import commands


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxlm", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train a model; resumes from the latest checkpoint in --workdir")
  train.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  train.add_argument("--workdir", required=True)
  evaluate = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  evaluate.add_argument("--max-batches", type=int, default=None, help="limit the batches scored (default: config)")
  return p


def main(argv: list[str] | None = None) -> int:
  args, rest = parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    print(f"jaxlm: error: unrecognized arguments {' '.join(unknown)}; see `jaxlm {args.command} --help`",
          file=sys.stderr)
    return 2
  if overrides and args.command != "train":
    print(f"jaxlm: error: {args.command} uses the run's saved config; --config.* overrides apply to train only",
          file=sys.stderr)
    return 2
  return commands.run(args, overrides)


if __name__ == "__main__":
  sys.exit(main())
