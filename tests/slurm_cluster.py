"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd from the system's
packages, each with its own configuration, sockets, ports and state under one folder, so nothing of the system's
own configuration (/etc/slurm, /etc/munge, /run/munge) is read or changed.

`tests/services/install_slurm.sh` installs the packages where they are missing (root and apt-get). The cluster
has one partition of one node with 2 CPUs (`SelectType=select/cons_tres`, `ProctrackType=proctrack/linuxproc`,
`TaskPlugin=task/none`: no cgroups), enough for a job of 2 tasks. A requeued job may start again 6 s after it
ended (`cred_expire=5`; SLURM's default holds it for 121 s). Clients find it through SLURM_CONF, which
`Cluster.env` sets.

Under pytest-xdist both workers share the cluster: `shared` starts it once, under a file lock, and counts the
workers using it; the last one to let go stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

from support import REPO, free_port

INSTALL = REPO / "tests" / "services" / "install_slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
_START_TIMEOUT_S = 60


class Unavailable(Exception):
  """SLURM cannot run here: the message says why (the tests skip with it)."""


class Cluster(NamedTuple):
  """A running cluster: its folder (configuration, logs, state) and the environment its clients need."""

  folder: Path

  @property
  def env(self) -> dict[str, str]:
    """os.environ with SLURM_CONF pointing at this cluster (srun, sbatch and scontrol read it)."""
    return {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}

  def run(
    self, *command: str, env: dict[str, str] | None = None, timeout: float = 60, check: bool = True
  ) -> subprocess.CompletedProcess:
    """Runs a client command (`scontrol ...`, `srun ...`) against this cluster, with `env` added to the environment
    (srun and sbatch pass it on to the job); returns the CompletedProcess."""
    result = subprocess.run(
      list(command), capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=timeout
    )
    if check and result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
    return result

  def job(self, job_id: str) -> dict[str, str]:
    """`scontrol show job` of `job_id` as a dict (JobState, RestartCnt, ExitCode, ...)."""
    words = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout.split()
    return dict(word.split("=", 1) for word in words if "=" in word)

  def logs(self) -> str:
    """The tails of the daemons' logs, to explain a failure."""
    tails = []
    for name in DAEMONS:
      log = self.folder / f"{name}.log"
      if log.exists():
        tails.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    return "\n".join(tails)


def ensure_installed() -> None:
  """Installs the packages with install_slurm.sh where they are missing; raises Unavailable where it cannot."""
  result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
  if result.returncode == 3:
    raise Unavailable(result.stderr.strip())
  if result.returncode != 0:
    raise RuntimeError(f"{INSTALL} failed ({result.returncode}): {result.stderr[-2000:]}")


def _config(folder: Path) -> str:
  user = getpass.getuser()
  host = socket.gethostname().split(".")[0]
  return f"""\
ClusterName=jaxlmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=5
CredType=cred/munge
PlugStackConfig={folder}/plugstack.conf
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(folder: Path, name: str) -> int | None:
  path = folder / f"{name}.pid"
  with contextlib.suppress(OSError, ValueError):
    return int(path.read_text().split()[0])
  return None


def start(folder: Path) -> Cluster:
  """Starts munged, slurmctld and slurmd with their files in `folder` (made empty first) and waits until the node
  takes jobs; returns the Cluster. Raises RuntimeError (with the daemons' logs) when it does not come up."""
  shutil.rmtree(folder, ignore_errors=True)
  for sub in ("state", "spool"):
    (folder / sub).mkdir(parents=True)
  folder.chmod(0o755)  # munged refuses a key or socket in a folder that others may write
  key = folder / "munge.key"
  key.write_bytes(secrets.token_bytes(1024))
  key.chmod(0o400)
  (folder / "plugstack.conf").write_text("")
  (folder / "slurm.conf").write_text(_config(folder))
  cluster = Cluster(folder)
  try:
    subprocess.run(
      [
        "munged",
        "--force",
        f"--socket={folder}/munge.socket",
        f"--key-file={key}",
        f"--pid-file={folder}/munged.pid",
        f"--log-file={folder}/munged.log",
        f"--seed-file={folder}/munged.seed",
      ],
      check=True,
      capture_output=True,
      timeout=30,
    )
    for daemon in ("slurmctld", "slurmd"):  # each forks into the background once it has read its configuration
      extra = ["-c", "-i"] if daemon == "slurmctld" else []  # -c: no state from an earlier cluster
      subprocess.run(
        [daemon, "-f", str(folder / "slurm.conf"), *extra], check=True, capture_output=True, env=cluster.env, timeout=30
      )
    deadline = time.monotonic() + _START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
      result = cluster.run("sinfo", "--noheader", "--format=%T", check=False, timeout=10)
      state = result.stdout.strip()
      if result.returncode == 0 and state == "idle":
        return cluster
      time.sleep(0.5)
    raise RuntimeError(f"the SLURM node did not become idle in {_START_TIMEOUT_S} s (sinfo: {state!r})")
  except Exception as e:
    logs = cluster.logs()
    stop(folder)
    raise RuntimeError(f"the test SLURM cluster in {folder} did not start: {e}\n{logs}") from None


def stop(folder: Path) -> None:
  """Cancels the jobs still in the cluster in `folder`, waits for them to end (their slurmstepd would outlive
  slurmd), then stops the daemons by their pid files."""
  cluster = Cluster(folder)
  with contextlib.suppress(Exception):  # a cluster that failed to start has no controller to ask
    cluster.run("scancel", "--full", "--partition=test", check=False, timeout=10)
    deadline = time.monotonic() + 60  # KillWait (30 s) and the ending of the jobs' steps
    while time.monotonic() < deadline and cluster.run("squeue", "--noheader", check=False, timeout=10).stdout.strip():
      time.sleep(0.5)
  for name in reversed(DAEMONS):
    pid = _pid(folder, name)
    if pid is None:
      continue
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
      time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def shared(folder: Path, user: str):
  """The cluster in `folder`, started by the first user (e.g. an xdist worker's name) and stopped by the last.

  Yields:
    the running Cluster.
  """
  users = folder.parent / f"{folder.name}.users.json"

  @contextlib.contextmanager
  def locked():
    with open(f"{folder}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      yield json.loads(users.read_text()) if users.exists() else []

  with locked() as current:
    running = bool(current) and all(
      _pid(folder, name) and Path(f"/proc/{_pid(folder, name)}").exists() for name in DAEMONS
    )
    cluster = Cluster(folder) if running else start(folder)
    users.write_text(json.dumps([*current, user] if running else [user]))
  try:
    yield cluster
  finally:
    with locked() as current:
      left = [name for name in current if name != user]
      users.write_text(json.dumps(left))
      if not left:
        stop(folder)
