"""Tokens/s of the input pipeline alone: stdlib corpus (or prepared shards), byte tokenizer, seq 256, batch 16.

    python benchmarks/data_speed.py [--batches 2000] [--threads 0 2] [--train-tokens-per-s 3000]
        [--prepared-dir DIR] [--mixture "[('DIR1', 0.7), ('DIR2', 0.3)]"]

Builds the training rows exactly as `jaxlm train` does (`trainer.prepare_data`)
and times `jaxlm.data.pipeline.train_batches`, the iterator the training loop reads,
for each grain thread count. The one-off cost of reading and tokenizing the
corpus (or of opening the prepared shards) is reported separately.
`--train-tokens-per-s` (the train step's rate, from benchmarks/train_speed.py)
turns the rate into a headroom factor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlm import config as config_lib
from jaxlm.data import pipeline as data
from jaxlm.training import trainer


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, default=2000)
  p.add_argument("--threads", type=int, nargs="+", default=[0, 2])
  p.add_argument("--train-tokens-per-s", type=float, default=0.0)
  p.add_argument("--prepared-dir", default="", help="a `jaxlm prepare --out` folder instead of the stdlib text")
  p.add_argument("--mixture", default="", help="data.mixture: prepared folders and weights")
  args = p.parse_args(argv)
  config = config_lib.load_config_file(str(ROOT / "configs" / "default.py"))
  config.data.seq_len, config.train.global_batch_size = 256, 16
  if args.prepared_dir or args.mixture:
    config.data.source, config.data.prepared_dir, config.data.mixture = "prepared", args.prepared_dir, args.mixture

  start = time.perf_counter()
  rows = trainer.prepare_data(config, trainer.load_tokenizer(config), "train")
  print(
    f"{'open the prepared shards' if args.prepared_dir or args.mixture else 'read + tokenize + pack'} of the "
    f"train split: {time.perf_counter() - start:.2f} s, {len(rows):,} rows"
  )
  tokens_per_batch = config.train.global_batch_size * config.data.seq_len
  for threads in args.threads:
    batches = data.train_batches(
      rows, config.train.global_batch_size, config.data.shuffle_seed, 0, args.batches, threads
    )
    next(batches)  # thread start-up and the first shuffle block are not steady state
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    rate = count * tokens_per_batch / (time.perf_counter() - start)
    headroom = f", {rate / args.train_tokens_per_s:,.0f}x the train step" if args.train_tokens_per_s else ""
    print(
      f"train_batches, {threads} threads: {rate:,.0f} tokens/s ({rate / tokens_per_batch:,.0f} batches/s){headroom}",
      flush=True,
    )


if __name__ == "__main__":
  main()
