"""Serving throughput: `jaxlm serve` with continuous batching vs static batching vs the server at git HEAD.

Command:   python benchmarks/serve_throughput.py [--clients 64 --requests 3 --max-batch 16 --d-model 128]
Model:     configs/tiny.py's shape widened to --d-model (4 layers, context 256), random weights, byte tokenizer.
Workload:  --clients concurrent clients, each sending --requests completions one after another (a closed
           loop), greedy, max_tokens drawn uniformly from [8, 160] (seeded: every server gets the same
           requests and, greedy, decodes the same tokens). A warm-up request per distinct prompt first (compiles
           the prefill shapes).
Measures:  completion tokens per second (all clients' tokens / wall time) and p50/p99 request latency, for
           (a) the server at git HEAD (`git archive HEAD jaxlm` unpacked in a temporary folder, run from there:
           nothing in the working tree or git state changes), (b) `--batching static`, (c) `--batching
           continuous`, one after the other on the same machine, each a fresh `jaxlm serve` process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_run(folder: Path, d_model: int) -> Path:
  import jax
  import jax.numpy as jnp

  from jaxlm import config as config_lib
  from jaxlm import hf
  from jaxlm.models import transformer as model_lib

  config = config_lib.load_config_file(str(REPO / "configs" / "tiny.py"))
  config.model.update(d_model=d_model, mlp_dim=4 * d_model, num_layers=4, max_len=256)
  params = model_lib.build(config.model).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, folder / "run")


def start_server(run: Path, port: int, extra: list[str], pythonpath: str | None, log: Path) -> subprocess.Popen:
  env = dict(os.environ)
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  command = [sys.executable, "-m", "jaxlm", "serve", "--workdir", str(run), "--port", str(port), *extra]
  return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env, cwd=pythonpath or REPO)


async def run_clients(url: str, requests: list[list[dict]]) -> tuple[float, int, list[float]]:
  import aiohttp

  latencies, tokens = [], [0]

  async def client(session, bodies):
    for body in bodies:
      start = time.perf_counter()
      async with session.post(url + "/v1/completions", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
      latencies.append(time.perf_counter() - start)
      tokens[0] += answer["usage"]["completion_tokens"]

  timeout = aiohttp.ClientTimeout(total=3600)
  async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
    # One request per distinct prompt compiles every prefill shape the run uses before the clock starts.
    prompts = sorted({body["prompt"] for bodies in requests for body in bodies})
    await client(session, [{"prompt": prompt, "max_tokens": 4} for prompt in prompts])
    latencies.clear()
    tokens[0] = 0
    start = time.perf_counter()
    await asyncio.gather(*(client(session, bodies) for bodies in requests))
    return time.perf_counter() - start, tokens[0], latencies


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
  import urllib.error
  import urllib.request

  deadline = time.time() + 600
  while True:
    try:
      urllib.request.urlopen(url + "/health", timeout=5).read()
      return
    except (urllib.error.URLError, ConnectionError):
      if process.poll() is not None or time.time() > deadline:
        raise SystemExit(f"the server did not start:\n{log.read_text()}")
      time.sleep(0.5)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--requests", type=int, default=3, help="completions per client, one after another")
  p.add_argument("--max-batch", type=int, default=16, help="decode rows of every server")
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--servers", default="head,static,continuous")
  p.add_argument("--make-run", help=argparse.SUPPRESS)  # writes the run only (run with HEAD's code for HEAD)
  args = p.parse_args()
  if args.make_run:
    make_run(Path(args.make_run), args.d_model)
    return

  rng = random.Random(0)
  prompts = ["def parse(text):", "import os", "class Node:", "for i in range(", "return x +"]
  requests = [
    [{"prompt": rng.choice(prompts), "max_tokens": rng.randint(8, 160)} for _ in range(args.requests)]
    for _ in range(args.clients)
  ]
  results = {}
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    head = folder / "head"
    head.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "jaxlm"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
    servers = {
      "head": ([], str(head)),
      "static": (["--batching", "static"], None),
      "continuous": (["--batching", "continuous"], None),
    }
    for index, name in enumerate(args.servers.split(",")):
      extra, pythonpath = servers[name]
      # The same weights (seeded), written by the code that serves them: configs gain keys between commits.
      run = folder / f"{index}-{name}-run"
      env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
      make = [sys.executable, __file__, "--make-run", str(run), "--d-model", str(args.d_model)]
      subprocess.run(make, check=True, env=env, cwd=pythonpath or REPO)
      run = run / "run"
      port = 18000 + index
      log = folder / f"{name}.log"
      process = start_server(run, port, ["--max-batch", str(args.max_batch), *extra], pythonpath, log)
      try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        wall, tokens, latencies = asyncio.run(run_clients(url, requests))
        print(f"{name}: /health {urllib.request.urlopen(url + '/health').read().decode()}", flush=True)
      finally:
        process.terminate()
        process.wait(60)
      results[name] = (tokens / wall, np.percentile(latencies, 50), np.percentile(latencies, 99), tokens, wall)
      print(f"{name}: done in {wall:.1f} s", flush=True)

  print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args}")
  print(f"{'server':<12} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'tokens':>7} {'wall s':>7}")
  for name, (rate, p50, p99, tokens, wall) in results.items():
    print(f"{name:<12} {rate:9.1f} {p50:7.2f} {p99:7.2f} {tokens:7d} {wall:7.1f}")
  if "head" in results and "continuous" in results:
    print(f"continuous / head throughput: {results['continuous'][0] / results['head'][0]:.2f}x")


if __name__ == "__main__":
  main()
