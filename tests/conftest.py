"""Shared test setup: 8 CPU devices, tiny configs, and a small text corpus.

XLA_FLAGS must be set before JAX initializes its backend, so it happens here,
at import time, before any test module imports jax.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import corpus  # noqa: E402

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


def files_config(text_corpus: Path, **model_overrides):
  c = tiny_config(**model_overrides)
  c.data.source = "files"
  c.data.paths = str(text_corpus / "*.txt")
  c.data.val_fraction = 0.2
  return c


def run_cli(args: list[str], env_extra: dict | None = None, devices: int = 8, timeout: int = 600):
  """Runs `python -m jaxlm.main ...` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "jaxlm.main", *args], capture_output=True, text=True,
                        env=env, timeout=timeout, cwd=REPO)
