"""Data at scale: synthetic corpora, `jaxlm prepare` throughput, and `jaxlm train`'s memory and start-up.

    python benchmarks/data_scale.py corpus --out /tmp/corpus_50m --mb 50
    python benchmarks/data_scale.py prepare --corpus /tmp/corpus_50m --out /tmp/prepared_50m [--workers 2]
        [--tokenizer-path spm.model]
    python benchmarks/data_scale.py train --label prepared-50m -- --config.data.source=prepared \
        --config.data.prepared_dir=/tmp/prepared_50m

`corpus` copies the standard library's `.py` files (no tests: 734 files,
12 MB) until the size is reached, each copy in its own folder and each file
with a first line naming its copy, so no two documents are equal.

`prepare` times `jaxlm prepare` on the corpus (both splits, fresh output) and,
on the same bytes, a plain single-process loop of the tokenizer alone
(`encode` of every file already in memory), and prints both in MB/s.

`train` runs `jaxlm train --config configs/default.py` (the default job) for
20 steps in a fresh process, with the arguments after `--`, and prints its
peak resident memory (`wait4`'s ru_maxrss) and the seconds from launch to the
end of step 1 (the "step 1:" log line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlm import config as config_lib
from jaxlm.data import corpus
from jaxlm.data import tokenizer as tokenizer_lib


def make_corpus(out: Path, megabytes: float) -> None:
  files = [
    (path, path.relative_to(corpus.stdlib_root()), corpus.read_text_bytes(path)) for path in corpus.stdlib_files()
  ]
  written, copy = 0, 0
  while written < megabytes * 1e6:
    for _, relative, text in files:
      target = out / f"copy{copy:04d}" / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      data = f"# copy {copy} of {relative}\n".encode() + text
      target.write_bytes(data)
      written += len(data)
    copy += 1
  print(json.dumps({"corpus": str(out), "copies": copy, "files": copy * len(files), "mb": written / 1e6}))


def time_prepare(corpus_dir: Path, out: Path, workers: int, tokenizer_path: str) -> None:
  data_args = ["--config.data.source=files", f"--config.data.paths={corpus_dir}/**/*.py"]
  if tokenizer_path:
    data_args += ["--config.data.tokenizer=sentencepiece", f"--config.data.tokenizer_path={tokenizer_path}"]
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxlm",
      "prepare",
      "--config",
      str(ROOT / "configs" / "default.py"),
      "--out",
      str(out),
      "--workers",
      str(workers),
      *data_args,
    ],
    check=True,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  command_s = time.perf_counter() - start
  # The command's own figure ("prepared in S s"): listing, tokenizing and writing, without Python's start-up.
  prepare_s = float(result.stdout.split("prepared in ")[1].split(" s")[0])
  num_bytes = sum(
    json.loads((out / split / "index.json").read_text())["num_bytes"] for split in ("train", "validation")
  )

  config = config_lib.apply_overrides(config_lib.load_config_file(str(ROOT / "configs" / "default.py")), data_args)
  tokenizer = tokenizer_lib.from_config(config.data)
  paths = corpus.glob_files([f"{corpus_dir}/**/*.py"])
  start = time.perf_counter()
  texts = [corpus.read_text_bytes(path) for path in paths]
  read_s = time.perf_counter() - start
  start = time.perf_counter()
  tokens = sum(len(tokenizer.encode(text)) + 1 for text in texts)
  tokenize_s = time.perf_counter() - start
  print(
    json.dumps(
      {
        "tokenizer": type(tokenizer).__name__,
        "mb": num_bytes / 1e6,
        "workers": workers,
        "command_s": round(command_s, 1),
        "prepare_s": round(prepare_s, 1),
        "prepare_mb_per_s": round(num_bytes / 1e6 / prepare_s, 1),
        "tokenizer_alone_s": round(tokenize_s, 1),
        "tokenizer_alone_mb_per_s": round(num_bytes / 1e6 / tokenize_s, 1),
        "read_files_s": round(read_s, 1),
        "tokens": tokens,
      }
    )
  )


def time_train(label: str, extra: list[str], steps: int) -> None:
  workdir = Path(f"/tmp/data_scale_run_{os.getpid()}")
  shutil.rmtree(workdir, ignore_errors=True)
  args = [
    sys.executable,
    "-m",
    "jaxlm",
    "train",
    "--config",
    str(ROOT / "configs" / "default.py"),
    "--workdir",
    str(workdir),
    f"--config.train.num_steps={steps}",
    "--config.train.log_every=10",
    "--config.train.eval_batches=2",
    *extra,
  ]
  start = time.perf_counter()
  process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  first_step_s, tail = None, []
  for line in process.stderr:
    tail = (tail + [line])[-20:]
    if first_step_s is None and line.startswith("step 1:"):
      first_step_s = time.perf_counter() - start
  _, status, usage = os.wait4(process.pid, 0)
  shutil.rmtree(workdir, ignore_errors=True)
  if status:
    sys.exit("".join(tail))
  print(
    json.dumps(
      {
        "label": label,
        "steps": steps,
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "first_step_s": round(first_step_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
      }
    )
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("corpus")
  c.add_argument("--out", type=Path, required=True)
  c.add_argument("--mb", type=float, required=True)
  r = sub.add_parser("prepare")
  r.add_argument("--corpus", type=Path, required=True)
  r.add_argument("--out", type=Path, required=True)
  r.add_argument("--workers", type=int, default=2)
  r.add_argument("--tokenizer-path", default="", help="a SentencePiece model (default: the byte tokenizer)")
  t = sub.add_parser("train")
  t.add_argument("--label", required=True)
  t.add_argument("--steps", type=int, default=20)
  t.add_argument("extra", nargs="*", help="after --: more jaxlm train arguments")
  args = p.parse_args(argv)
  if args.command == "corpus":
    make_corpus(args.out, args.mb)
  elif args.command == "prepare":
    time_prepare(args.corpus, args.out, args.workers, args.tokenizer_path)
  else:
    time_train(args.label, args.extra, args.steps)


if __name__ == "__main__":
  main()
