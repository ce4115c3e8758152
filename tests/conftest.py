"""Shared test setup: 8 CPU devices, a compilation cache, a small text corpus and one CLI run.

XLA_FLAGS and the cache settings must be set before JAX initializes, so it
happens here, at import time, before any test module imports jax. Under
pytest-xdist the workers inherit them from the controller, so they share one
cache; the session fixtures below are built once per run, by whichever worker
needs them first, and read by all. Helpers live in tests/support.py.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The suite compiles hundreds of small programs that then run for milliseconds: at XLA's CPU optimization level 0
# LLVM spends about a sixth less time on each (measured on tests/unit/test_families.py). What the programs compute
# is the same; only their speed differs. `JAXLM_TESTS_XLA_FLAGS= pytest tests` runs the suite at the default level.
os.environ.setdefault("JAXLM_TESTS_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", os.environ["JAXLM_TESTS_XLA_FLAGS"]]
).strip()
# Most tests compile the same few programs again (the train, eval and decode steps of configs/tiny.py, in this
# process and in the `jaxlm` processes they start, which inherit the environment); XLA's persistent cache
# compiles each once. It lives for this session only, and caches every program: tiny ones compile in less than
# JAX's default threshold of 1 s but add up to most of the suite's time. The controller of a parallel run makes
# it and removes it at exit; its workers (and their `jaxlm` processes) find it set.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# MFU on CPU divides by a nominal peak measured once per machine and cached under XDG_CACHE_HOME
# (jaxlm/training/flops.py): the session gets its own cache, so tests neither read a peak from the home
# folder nor write one there; the first process to need it measures it, the rest read it.
if "JAXLM_TESTS_CACHE" not in os.environ:
  os.environ["JAXLM_TESTS_CACHE"] = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxlm-tests-cache-")
  atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import pytest
from support import REPO, built_once, run_cli

from jaxlm.data import corpus


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
  """About 100 kB of real text: a few standard-library modules, concatenated into files."""
  with built_once(tmp_path_factory, "corpus") as (directory, build):
    if build:
      for i, path in enumerate(corpus.stdlib_files()[100:130]):
        (directory / f"doc{i:02d}.txt").write_bytes(corpus.read_text_bytes(path)[:4000])
  return directory


@pytest.fixture(scope="session")
def cli_run(text_corpus, tmp_path_factory) -> tuple[Path, str]:
  """One `jaxlm train` of configs/tiny.py on `text_corpus`, shared by the tests that need any CLI-trained run:
  6 steps on one device, logged every 2, evaluated and saved at step 6, stderr a pipe. Returns (workdir, stderr).
  Tests read it; only `jaxlm eval` adds its report."""
  with built_once(tmp_path_factory, "cli_run") as (folder, build):
    workdir, stderr = folder / "run", folder / "stderr.txt"
    if build:
      result = run_cli(
        [
          "train",
          "--config",
          str(REPO / "configs" / "tiny.py"),
          "--workdir",
          str(workdir),
          "--config.data.source=files",
          f"--config.data.paths={text_corpus}/*.txt",
          "--config.data.val_fraction=0.2",
          "--config.train.num_steps=6",
          "--config.train.log_every=2",
          "--config.train.eval_every=6",
          "--config.train.checkpoint_every=6",
          "--config.train.eval_batches=1",
        ],
        devices=1,
      )
      assert result.returncode == 0, result.stderr[-3000:]
      stderr.write_text(result.stderr)
  return workdir, stderr.read_text()


def pytest_collection_modifyitems(items):
  """Files with slow tests first (stable otherwise). With `-n 3 --dist loadfile` each file runs whole on one
  worker, in this order, so the long files start first and the short ones fill in around them at the end,
  instead of one long file starting last and running alone."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
