"""The fault matrix of issue 11 for runs of several processes, through the real CLI: a lost peer or coordinator,
a peer lost during a save, SIGTERM to some or all processes, a process that cannot join, and the supervisor that
turns the runtime's C++ aborts into one line. Each case ends with one `jaxlm: error:` line (or the documented
exit status) and no traceback. Split from test_faults.py so the two files run on different test workers.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, error_line, free_port, run_cli, run_in_process, train_args, xla_flags

C_PLUS_PLUS_ABORT = re.compile(r"^F\d{4} |Check failure stack trace|terminate called|^\s+@\s+0x", re.MULTILINE)


LOST = [  # (the process killed, CPU devices per process, how the survivor learns of it)
  pytest.param(1, 2, id="peer"),  # the watchdog: no sign of life for heartbeat_timeout_s
  pytest.param(0, 2, id="coordinator"),  # the runtime aborts the other about 0.1 s later; the supervisor speaks
]


@pytest.mark.slow
@pytest.mark.parametrize("victim,devices", LOST)
def test_lost_process_is_named_and_the_survivor_exits(victim, devices, text_corpus, tmp_path):
  # 2 devices per process: with 4, gloo itself aborted the survivor within a second on this machine
  # ("Received data size doesn't match expected size"), a case the supervisor tests below cover.
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(devices),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
    JAX_NUM_PROCESSES="2",
  )
  run = tmp_path / "run"
  args = [
    sys.executable,
    "-m",
    "jaxlm",
    *train_args(text_corpus, run, "--config.train.num_steps=100000", "--config.distributed.heartbeat_timeout_s=10"),
  ]
  processes = [
    subprocess.Popen(
      args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i))
    )
    for i in range(2)
  ]
  survivor = processes[1 - victim]
  try:
    for line in processes[0].stderr:  # process 0 logs the steps
      if "step 2:" in line:
        break
    processes[victim].send_signal(signal.SIGKILL)  # its supervisor: the kernel then kills the training child
    killed_at = time.monotonic()
    _, stderr = survivor.communicate(timeout=120)
    assert time.monotonic() - killed_at < 30
  finally:
    for process in processes:
      process.kill()
  assert survivor.returncode == 1, stderr[-3000:]
  assert not C_PLUS_PLUS_ABORT.search(stderr), stderr[-3000:]
  line = error_line(stderr)
  assert ("lost the coordinator (process 0)" if victim == 0 else "lost process 1") in line, line
  if victim == 0:  # the runtime's own report is kept, and named
    crash_logs = list(run.glob("crash-*.log"))
    assert len(crash_logs) == 1 and str(crash_logs[0]) in line, line
    assert "Check failure stack trace" in crash_logs[0].read_text()


def start_two_processes(text_corpus, run: Path, *extra: str) -> list[subprocess.Popen]:
  """`jaxlm train` as processes 0 and 1 of one run (2 CPU devices each, gloo), on `run`; stderr piped."""
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(2),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
    JAX_NUM_PROCESSES="2",
  )
  args = [sys.executable, "-m", "jaxlm", *train_args(text_corpus, run, *extra)]
  return [
    subprocess.Popen(
      args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i))
    )
    for i in range(2)
  ]


@pytest.mark.slow
def test_a_peer_lost_during_a_save_is_named_not_taken_for_a_full_disk(text_corpus, tmp_path):
  # Process 1's training child (not its supervisor) is killed as process 0 logs step 4, a save step: the save's
  # collective breaks in the survivor ("Gloo AllGather failed: Connection closed by peer"), which used to exit
  # after 54 s saying "Free space or pick another --workdir".
  processes = start_two_processes(
    text_corpus, tmp_path / "run", "--config.train.num_steps=100000", "--config.distributed.heartbeat_timeout_s=10"
  )
  try:
    for line in processes[0].stderr:
      if "step 4:" in line:
        break
    child = int(Path(f"/proc/{processes[1].pid}/task/{processes[1].pid}/children").read_text().split()[0])
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = processes[0].communicate(timeout=120)
    assert time.monotonic() - killed_at < 30, stderr[-3000:]
  finally:
    for process in processes:
      process.kill()
  assert processes[0].returncode == 1, stderr[-3000:]
  line = error_line(stderr)
  assert "lost process 1" in line and "process 0 of 2 stops" in line, line
  assert "Free space" not in stderr, stderr[-3000:]


def test_a_broken_collective_in_a_save_is_not_called_a_disk_problem(tmp_path):
  from jaxlm.storage import checkpoint

  checkpointer = checkpoint.Checkpointer(tmp_path / "checkpoints")
  try:
    broken = RuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:9118")
    message = str(checkpointer._save_error(4, broken))
  finally:
    checkpointer.close()
  assert "saving step 4" in message and "stopped reaching each other" in message and "Gloo" in message, message
  assert "Free space" not in message and "free there" not in message, message


STOPS = [  # (the line of process 0 after which to signal, the processes signalled in turn)
  pytest.param("step 2:", [1], id="one-process"),  # process 1 only: process 0 learns of it from the runtime
  pytest.param("step 2:", [0, 1], id="both-apart"),  # as SLURM does: every process, at different moments
  pytest.param("devices:", [0], id="start-up"),  # after jax.distributed.initialize, before the first step
]


@pytest.mark.slow
@pytest.mark.parametrize("after,signalled", STOPS)
def test_sigterm_stops_every_process_at_the_same_step(after, signalled, text_corpus, tmp_path, capfd):
  run = tmp_path / "run"
  processes = start_two_processes(text_corpus, run, "--config.train.num_steps=100000")
  try:
    seen = []
    for line in processes[0].stderr:  # process 0 logs for the run
      seen.append(line)
      if after in line:
        break
    for process in signalled:
      processes[process].send_signal(signal.SIGTERM)  # its supervisor passes it on to the training child
      time.sleep(0.5)
    stderr = "".join(seen) + processes[0].communicate(timeout=60)[1]
    assert processes[1].wait(timeout=30) == 143, processes[1].stderr.read()[-3000:]
  finally:
    for process in processes:
      process.kill()
  assert processes[0].returncode == 143, stderr[-3000:]
  stopped = re.findall(r"stopped at step (\d+);", stderr)
  assert len(stopped) == 1, stderr[-3000:]
  step = int(stopped[0])
  assert json.loads((run / "train_summary.json").read_text())["stop_reason"] == "sigterm"
  if after == "devices:":
    assert step == 1, stderr[-3000:]
  # Both processes saved that step (a save needs every process): it is the newest intact one, which a rerun
  # resumes from (restore_newest_intact).
  verify = run_in_process(["verify", "--workdir", str(run)], capfd)
  assert verify.returncode == 0, verify.stdout + verify.stderr[-3000:]
  intact = re.search(r"intact steps: ([\d, ]+)", verify.stdout)
  assert intact and int(intact.group(1).split(",")[-1]) == step, verify.stdout


@pytest.mark.slow
def test_a_process_that_cannot_join_retries_then_says_so(text_corpus, tmp_path):
  # Joining is fatal inside JAX's runtime (a C++ abort), so the supervisor, not Python, retries it.
  env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  result = run_cli(
    train_args(
      text_corpus,
      tmp_path / "run",
      "--config.distributed.initialization_timeout_s=2",
      "--config.distributed.initialization_attempts=2",
    ),
    env_extra=env,
    devices=2,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert not C_PLUS_PLUS_ABORT.search(result.stderr), result.stderr[-3000:]
  assert result.stderr.count("could not join the coordinator (DEADLINE_EXCEEDED") == 1  # then the second attempt
  line = error_line(result)
  assert f"could not join the coordinator at {env['JAX_COORDINATOR_ADDRESS']} in 2 attempt(s)" in line, line
  assert "distributed.initialization_timeout_s" in line and "process 1 of 2 stops" in line


def supervise(tmp_path: Path, child_code: str) -> subprocess.Popen:
  """`jaxlm.parallel.supervisor.run` (as process 1 of 2, workdir tmp_path) in a subprocess, on a child running `child_code`."""
  code = (
    "import sys; from jaxlm.parallel import supervisor; "
    f"sys.exit(supervisor.run([sys.executable, '-c', {child_code!r}], "
    f"supervisor.Launch(1, 2, {str(tmp_path)!r})))"
  )
  return subprocess.Popen(
    [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
  )


GLOO_ABORT = """
import os, sys
print("step 3: loss 4.2", file=sys.stderr, flush=True)
print("out", flush=True)
sys.stderr.write("W1129 22:44:45.870880   23132 pair.cc:1] a warning just before the abort\\n"
                 "terminate called after throwing an instance of 'gloo::EnforceNotMet'\\n"
                 "  what():  [enforce fail at external/gloo/gloo/transport/tcp/pair.cc:446] op.preamble.length <= "
                 "op.nbytes. Received data size doesn't match expected size\\n")
sys.stderr.flush()
os.abort()
"""


def test_supervisor_turns_a_runtime_abort_into_one_line(tmp_path):
  supervisor = supervise(tmp_path, GLOO_ABORT)
  stdout, stderr = supervisor.communicate(timeout=60)
  assert supervisor.returncode == 1
  assert stdout == "out\n"  # the child's stdout is its own
  assert stderr.startswith("step 3: loss 4.2\n")  # the child's lines pass through
  assert not C_PLUS_PLUS_ABORT.search(stderr) and "a warning just before" not in stderr, stderr
  line = error_line(stderr)
  assert "lost process 0 in the middle of a collective" in line and "Received data size" in line, line
  assert "process 1 of 2 stops" in line
  crash_log = next(tmp_path.glob("crash-*.log"))
  assert str(crash_log) in line
  assert "a warning just before" in crash_log.read_text() and "terminate called" in crash_log.read_text()


def test_supervisor_passes_signals_and_exit_statuses_through(tmp_path):
  child = """
import signal, sys, time
print("W1129 22:44:45.870880   23132 any.cc:1] a runtime warning, shown after a second", file=sys.stderr, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
print("ready", flush=True)
time.sleep(600)
"""
  supervisor = supervise(tmp_path, child)
  assert supervisor.stdout.readline() == "ready\n"
  supervisor.send_signal(signal.SIGTERM)
  _, stderr = supervisor.communicate(timeout=60)
  assert supervisor.returncode == 143  # the child's own status (the trainer saves first, then exits 143)
  assert "a runtime warning, shown after a second" in stderr and "jaxlm: error" not in stderr, stderr


def test_killing_the_supervisor_kills_its_child(tmp_path):
  pid_file = tmp_path / "child.pid"
  supervisor = supervise(
    tmp_path,
    f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
    "print('ready', flush=True); time.sleep(60)",
  )
  assert supervisor.stdout.readline() == "ready\n"
  supervisor.kill()
  supervisor.communicate(timeout=60)
  child = int(pid_file.read_text())
  deadline = time.monotonic() + 10
  while (
    time.monotonic() < deadline
    and Path(f"/proc/{child}").exists()
    and "zombie" not in Path(f"/proc/{child}/status").read_text()
  ):
    time.sleep(0.1)
  assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
