"""Shared test setup: 8 CPU devices, a compilation cache, tiny configs, a small text corpus and one CLI run.

XLA_FLAGS and the cache settings must be set before JAX initializes, so it
happens here, at import time, before any test module imports jax.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Most tests compile the same few programs again (the train, eval and decode steps of configs/tiny.py, in this
# process and in the `jaxlm` processes they start, which inherit the environment); XLA's persistent cache
# compiles each once. It lives for this session only, and caches every program: tiny ones compile in less than
# JAX's default threshold of 1 s but add up to most of the suite's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm.data import corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def tiny_config(**model_overrides):
  """configs/tiny.py (2 layers, d_model 32, seq 32, batch 8), shortened to 6 steps for tests."""
  c = config_lib.load_config_file(str(REPO / "configs" / "tiny.py"))
  for key, value in model_overrides.items():
    c.model[key] = value
  c.train.num_steps = 6
  c.train.log_every = 1
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.optim.warmup_steps = 2
  c.eval.max_batches = 2
  return c


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
  """About 100 kB of real text: a few standard-library modules, concatenated into files."""
  directory = tmp_path_factory.mktemp("corpus")
  for i, path in enumerate(corpus.stdlib_files()[100:130]):
    (directory / f"doc{i:02d}.txt").write_bytes(corpus.read_text_bytes(path)[:4000])
  return directory


@pytest.fixture(scope="session")
def cli_run(text_corpus, tmp_path_factory) -> tuple[Path, str]:
  """One `jaxlm train` of configs/tiny.py on `text_corpus`, shared by the tests that need any CLI-trained run:
  6 steps on one device, logged every 2, evaluated and saved at step 6, stderr a pipe. Returns (workdir, stderr).
  Tests read it; only `jaxlm eval` adds its report."""
  workdir = tmp_path_factory.mktemp("cli_run")
  result = run_cli(["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
                    "--config.data.source=files", f"--config.data.paths={text_corpus}/*.txt",
                    "--config.data.val_fraction=0.2", "--config.train.num_steps=6", "--config.train.log_every=2",
                    "--config.train.eval_every=6", "--config.train.checkpoint_every=6",
                    "--config.train.eval_batches=1"], devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stderr


def files_config(text_corpus: Path, **model_overrides):
  c = tiny_config(**model_overrides)
  c.data.source = "files"
  c.data.paths = str(text_corpus / "*.txt")
  c.data.val_fraction = 0.2
  return c


def run_cli(args: list[str], env_extra: dict | None = None, devices: int = 8, timeout: int = 600):
  """Runs `python -m jaxlm ...` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=REPO)
