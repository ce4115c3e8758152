"""The supervisor of multi-process runs (jaxlm/parallel/supervisor.py), in this process on small child programs: a
child's own exit status wins over lines that only look fatal; a process-count variable that is not a number is one
line. The runtime aborts and lost peers are in tests/integration/test_faults_processes.py."""

import sys

import pytest
from support import error_line, run_in_process, train_args

from jaxlm.parallel import supervisor

LOOKS_FATAL = """
import sys
sys.stderr.write("F1129 22:44:45.870880   23132 client.cc:1] a fatal-looking line from a library\\n"
                 "terminate called after throwing an instance of 'std::runtime_error'\\n")
sys.stderr.flush()
print("out", flush=True)
sys.exit({status})
"""


@pytest.mark.parametrize("status", [0, 143, 75])
def test_the_exit_status_wins_over_lines_that_look_fatal(status, tmp_path, capfd):
  returned = supervisor.run(
    [sys.executable, "-c", LOOKS_FATAL.format(status=status)], supervisor.Launch(1, 2, str(tmp_path))
  )
  stdout, stderr = capfd.readouterr()
  assert returned == status
  assert stdout == "out\n"
  assert "a fatal-looking line from a library" in stderr and "terminate called" in stderr  # shown, not withheld
  assert "jaxlm: error" not in stderr, stderr
  assert not list(tmp_path.glob("crash-*.log"))


@pytest.mark.parametrize("variable", ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"])
def test_a_process_variable_that_is_not_a_number_is_one_line(variable, text_corpus, tmp_path, capfd, monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  monkeypatch.setenv(variable, "abc")
  result = run_in_process(train_args(text_corpus, tmp_path / "run"), capfd)
  assert result.returncode == 2, result.stderr[-3000:]
  line = error_line(result)
  assert f"environment variable {variable}='abc' is not a whole number" in line, line
  assert not (tmp_path / "run" / "checkpoints").exists()
