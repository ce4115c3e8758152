"""`jaxlm train` under a real SLURM: srun's 2 tasks join one run, and slurm/train.sbatch resumes after a requeue.

The cluster (tests/slurm_cluster.py) runs on this machine: munged, slurmctld and slurmd, one node of 2 CPUs,
started once per session and shared by the xdist workers. Its packages are installed by
tests/services/install_slurm.sh where they are missing; the tests skip only where that cannot be done (no root
or no apt-get). Each process of a job gets 2 CPU devices, and `jax.distributed.initialize()` reads SLURM's
environment (`--config.distributed.num_processes=-1`).
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from support import REPO, train_args, xla_flags

pytestmark = pytest.mark.slow
SBATCH = REPO / "slurm" / "train.sbatch"
JOB_ENV = {"XLA_FLAGS": xla_flags(2)}  # 2 processes x 2 devices: batch 8 divides
# The template's GPU line, overridden for this CPU-only cluster; every other #SBATCH line is the template's own.
CPU_ONLY = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"]
JOINED = "devices: 4 x cpu (2 process(es))"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
  """The test cluster, started by the first worker that needs it and stopped by the last."""
  try:
    slurm_cluster.ensure_installed()
  except slurm_cluster.Unavailable as e:
    pytest.skip(f"no SLURM cluster can run here: {e}")
  if "PYTEST_XDIST_WORKER" in os.environ:
    folder = tmp_path_factory.getbasetemp().parent / "slurm"
  else:
    folder = tmp_path_factory.mktemp("slurm")
  with slurm_cluster.shared(folder, os.environ.get("PYTEST_XDIST_WORKER", "main")) as cluster:
    yield cluster


def _jaxlm() -> list[str]:
  return [sys.executable, "-m", "jaxlm"]


def _steps(workdir: Path) -> list[int]:
  """The complete checkpoint steps in `workdir`, ascending."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


ENDED = ("CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _wait_for(predicate, what: str, slurm, job: str, log: Path, timeout: float = 300):
  """Polls `predicate` until it returns something true, and returns that; fails the test, with the job's log, on a
  timeout or when the job ends first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    state = slurm.job(job)["JobState"]
    if state in ENDED:
      problem = f"the job ended ({state}) before {what}"
      break
    time.sleep(0.5)
  else:
    problem = f"timed out waiting for {what}"
  text = log.read_text(errors="replace") if log.exists() else "(no job log)"
  pytest.fail(f"{problem}\n{text[-3000:]}\n{slurm.logs()}")


def test_sbatch_template_runs_two_tasks_as_one_run_and_resumes_after_requeue(slurm, text_corpus, tmp_path):
  """The GPU template, run as-is but for its GPU request: its `srun` starts 2 tasks of `jaxlm train
  --config.distributed.num_processes=-1`, which join one run and write one checkpoint series. Requeued while
  training, the second run resumes from the newest checkpoint the first one left, in the same log, and continues
  the same series. (One job covers both: each run of a job costs a JAX start-up and a compile per process.)"""
  workdir, log = tmp_path / "run", tmp_path / "job.log"
  # Enough steps that the run is still going when it is requeued and when it is cancelled.
  args = train_args(text_corpus, workdir, "--config.train.num_steps=100000", "--config.train.log_every=10")
  submitted = slurm.run(
    "sbatch",
    "--parsable",
    *CPU_ONLY,
    "--time=10",
    f"--output={log}",
    f"--chdir={REPO}",
    str(SBATCH),
    args[2],  # CONFIG (after "train --config")
    args[4],  # WORKDIR (after "--workdir")
    *args[5:],
    env={**JOB_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},  # the template's `jaxlm`
  )
  job = submitted.stdout.strip().split(";")[0]

  def text() -> str:
    return log.read_text(errors="replace") if log.exists() else ""

  try:
    _wait_for(lambda: (workdir / "checkpoints").exists() and _steps(workdir), "a first checkpoint", slurm, job, log)
    slurm.run("scontrol", "requeue", job)
    # The script's first line of its second run: the first run is over, and the second has not started jaxlm yet.
    _wait_for(lambda: "(restart 1)" in text(), "the requeued job to start again", slurm, job, log)
    left = _steps(workdir)[-1]
    found = _wait_for(
      lambda: re.search(r"resumed from step (\d+)", text()), "the requeued run to resume", slurm, job, log
    )
    assert int(found.group(1)) == left, text()[-3000:]  # the newest checkpoint the first run left
    assert slurm.job(job)["Restarts"] == "1"
    _wait_for(lambda: _steps(workdir)[-1] > left, "a checkpoint of the resumed run", slurm, job, log)
  finally:
    slurm.run("scancel", job, check=False)
  deadline = time.monotonic() + 120
  while slurm.job(job)["JobState"] not in ENDED:
    assert time.monotonic() < deadline, f"the job did not end after scancel\n{slurm.logs()}"
    time.sleep(0.5)
  assert text().count(JOINED) == 2, text()[-3000:]  # each run: 2 processes in one run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [row["step"] for row in rows if "val_loss" not in row]  # training rows (validation rows share a step)
  assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer: no step twice, none out of order
  first_stop = re.search(r"stopped at step (\d+)", text())
  assert first_stop is None or int(first_stop.group(1)) == left  # where the first run saved at SIGTERM, if it did
  assert _steps(workdir)[-1] > left  # one series, continued by the second run
