"""Training from `gs://` shards: bytes each process reads, its peak memory, speed against local shards, exact resume.

    python benchmarks/bucket_stream.py [--gb 1.0] [--steps 40] [--work /tmp/bucket_stream]

Against the GCS emulator (tests/gcs_emulator.py), started here:

1. writes a deterministic text corpus of `--gb` gigabytes (words drawn by a seeded generator), and
   `jaxlm prepare`s it (byte tokenizer, 16 MB shards) both into `gs://bench/corpus` and into a local
   folder;
2. trains configs/tiny.py for `--steps` steps with 2 processes (jax.distributed over gloo, 1 CPU device
   each) from the bucket, then from the local shards. Each process reaches the emulator through its own
   byte-counting TCP proxy, so the bytes it downloaded (shards, index, headers, HTTP overhead) are
   counted outside jaxlm; its peak RSS is `wait4`'s ru_maxrss. Steps/s is the median of the logged
   windows' steps/s (metrics.jsonl `step_time_s`), compile excluded;
3. trains the bucket run again, kill -9s both processes once step 3/5 of the steps is logged (a
   checkpoint every fifth of the steps), runs the same command again, and compares the final params
   with the uninterrupted bucket run's, bit for bit.

It prints one JSON object with the figures. Work directories are local, so that the proxies count the
data reads only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import gcs_emulator  # noqa: E402  (tests/ on the path: the emulator the tests use)
import numpy as np  # noqa: E402

BUCKET = "bench"
TINY = str(ROOT / "configs" / "tiny.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class CountingProxy:
  """A TCP proxy to the emulator that counts the bytes sent back to its clients (one proxy per process)."""

  def __init__(self, upstream_port: int):
    self.upstream_port, self.port, self.received = upstream_port, free_port(), 0
    self.lock = threading.Lock()
    self.server = socket.create_server(("127.0.0.1", self.port))
    threading.Thread(target=self._accept, daemon=True).start()

  def _accept(self) -> None:
    while True:
      client, _ = self.server.accept()
      upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
      threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
      threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

  def _pipe(self, source: socket.socket, destination: socket.socket, count: bool) -> None:
    try:
      while data := source.recv(1 << 16):
        destination.sendall(data)
        if count:
          with self.lock:
            self.received += len(data)
    except OSError:
      pass
    finally:
      for s in (source, destination):
        try:
          s.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass


def write_corpus(folder: Path, gb: float, files: int = 64) -> int:
  """`files` text files of about gb/files each, words drawn from a fixed list by a seeded generator."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  words = np.array([f"w{i:x}".encode() for i in range(4096)] + [b"the", b"of", b"and", b"\n"], dtype=object)
  per_file, total = int(gb * 1e9 / files), 0
  for i in range(files):
    path = folder / f"part{i:03d}.txt"
    if not path.exists() or path.stat().st_size < per_file:
      pieces, size = [], 0
      while size < per_file:
        text = b" ".join(words[rng.integers(0, len(words), 1 << 20)])
        pieces.append(text)
        size += len(text)
      path.write_bytes(b"".join(pieces)[:per_file])
    total += path.stat().st_size
  (folder / "validation.txt").write_bytes(b"a small validation text\n" * 2000)
  return total


def jaxlm_prepare(out: str, corpus: Path, env: dict) -> float:
  started = time.perf_counter()
  subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxlm",
      "prepare",
      "--config",
      TINY,
      "--out",
      out,
      "--workers",
      "2",
      "--shard-mb",
      "16",
      "--config.data.source=files",
      f"--config.data.paths={corpus}/part*.txt",
      f"--config.data.validation_paths={corpus}/validation.txt",
    ],
    env=env,
    check=True,
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
  )
  return time.perf_counter() - started


def train_command(workdir: Path, prepared: str, steps: int) -> list[str]:
  return [
    sys.executable,
    "-m",
    "jaxlm",
    "train",
    "--config",
    TINY,
    "--workdir",
    str(workdir),
    "--config.data.source=prepared",
    f"--config.data.prepared_dir={prepared}",
    f"--config.train.num_steps={steps}",
    "--config.train.log_every=1",
    f"--config.train.checkpoint_every={max(steps // 5, 1)}",
    f"--config.train.eval_every={steps}",
    "--config.train.eval_batches=1",
    "--config.eval.max_batches=1",
  ]


def train_two(workdir: Path, prepared: str, steps: int, env: dict, emulator_port: int, kill_at: int = 0) -> dict:
  """Two processes of one run; returns {'bytes': [...], 'peak_rss_mb': [...], 'killed': bool}."""
  port, proxies, processes = free_port(), [], []
  for i in range(2):
    proxies.append(CountingProxy(emulator_port))
    process_env = {
      **env,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i),
      "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxies[i].port}",
    }
    processes.append(
      subprocess.Popen(
        train_command(workdir, prepared, steps),
        env=process_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
      )
    )
  killed, log = False, []
  if kill_at:
    for line in processes[0].stderr:
      log.append(line)
      if f"step {kill_at}:" in line:
        for process in processes:
          os.killpg(process.pid, signal.SIGKILL)
        killed = True
        break
  peaks = []
  for process in processes:
    threading.Thread(target=lambda p=process: log.extend(p.stderr), daemon=True).start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peaks.append(usage.ru_maxrss / 1024)
  if not killed and any(p.returncode for p in processes):
    raise RuntimeError(f"training failed: {[p.returncode for p in processes]}\n{''.join(log)[-3000:]}")
  return {"bytes": [p.received for p in proxies], "peak_rss_mb": peaks, "killed": killed}


def steps_per_s(workdir: Path) -> float:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  times = [row["step_time_s"] for row in rows if "step_time_s" in row][1:]  # the first window holds the compile
  return 1.0 / statistics.median(times)


def final_params_equal(first: Path, second: Path, step: int) -> bool:
  import jax

  from jaxlm import loader

  a, b = loader.load(str(first), step), loader.load(str(second), step)
  return all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gb", type=float, default=1.0)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--work", default="/tmp/bucket_stream")
  args = parser.parse_args()
  work = Path(args.work)
  for name in ("local", "runs"):
    shutil.rmtree(work / name, ignore_errors=True)
  corpus_bytes = write_corpus(work / "corpus", args.gb)
  emulator = gcs_emulator.Emulator().start()
  try:
    emulator.create_bucket(BUCKET)
    env = {**os.environ, **emulator.environment(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    results = {"corpus_bytes": corpus_bytes}
    results["prepare_gs_s"] = jaxlm_prepare(f"gs://{BUCKET}/corpus", work / "corpus", env)
    results["prepare_local_s"] = jaxlm_prepare(str(work / "local"), work / "corpus", env)
    index = json.loads((work / "local" / "train" / "index.json").read_text())
    results["train_shard_bytes"] = sum(s["header_bytes"] + 2 * s["num_tokens"] for s in index["shards"])
    results["shards"] = len(index["shards"])
    runs = work / "runs"
    gs = train_two(runs / "gs", f"gs://{BUCKET}/corpus", args.steps, env, emulator.port)
    local = train_two(runs / "local", str(work / "local"), args.steps, env, emulator.port)
    results["gs"] = {**gs, "steps_per_s": steps_per_s(runs / "gs")}
    results["local"] = {**local, "steps_per_s": steps_per_s(runs / "local")}
    killed = train_two(runs / "killed", f"gs://{BUCKET}/corpus", args.steps, env, emulator.port, 3 * args.steps // 5)
    resumed = train_two(runs / "killed", f"gs://{BUCKET}/corpus", args.steps, env, emulator.port)
    results["kill_9"] = {"killed": killed, "resumed": resumed}
    results["resume_bitwise"] = final_params_equal(runs / "gs", runs / "killed", args.steps)
    results["max_process_share_of_shards"] = max(gs["bytes"]) / results["train_shard_bytes"]
  finally:
    emulator.stop()
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
