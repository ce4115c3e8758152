"""experiments/*.sh run the checkout's own jaxlm (.venv/bin/jaxlm) without an activated venv, a JAXLM given
instead, or one on PATH; with none, one line that says how to get one."""

import os
import shutil
import subprocess
from pathlib import Path

from support import REPO

# Records its arguments; `eval` writes the report reproduce.sh copies to results.json.
STUB = """#!/bin/sh
echo "$0 $*" >> "$(dirname "$0")/calls.log"
if [ "$1" = eval ]; then echo '{"loss": 1.5}' > "$3/eval_step_6.json"; fi
"""


def checkout(tmp_path: Path, with_venv: bool) -> Path:
  """A copy of experiments/ and configs/tiny.py, with a stub jaxlm at .venv/bin/jaxlm when `with_venv`."""
  root = tmp_path / "checkout"
  shutil.copytree(REPO / "experiments", root / "experiments")
  (root / "configs").mkdir()
  shutil.copy(REPO / "configs" / "tiny.py", root / "configs")
  if with_venv:
    stub(root / ".venv" / "bin")
  return root


def stub(folder: Path) -> Path:
  folder.mkdir(parents=True)
  (folder / "jaxlm").write_text(STUB)
  (folder / "jaxlm").chmod(0o755)
  return folder / "jaxlm"


def reproduce(root: Path, workdir: Path, **env) -> subprocess.CompletedProcess:
  environment = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **env}  # no venv on PATH
  return subprocess.run(
    ["bash", str(root / "experiments" / "reproduce.sh"), "tiny", str(workdir)],
    capture_output=True,
    text=True,
    env=environment,
    timeout=30,
    cwd=root,
  )


def test_scripts_find_the_checkouts_jaxlm_without_activation(tmp_path):
  root = checkout(tmp_path, with_venv=True)
  workdir = tmp_path / "run"
  workdir.mkdir()
  result = reproduce(root, workdir)
  assert result.returncode == 0, result.stderr
  calls = (root / ".venv" / "bin" / "calls.log").read_text().splitlines()
  assert [call.split()[1] for call in calls] == ["train", "eval"]
  assert calls[0].startswith(f"{root}/.venv/bin/jaxlm train --config {root}/configs/tiny.py")
  assert (workdir / "results.json").read_text().strip() == '{"loss": 1.5}'


def test_jaxlm_given_or_on_path_and_none_is_one_line(tmp_path):
  root = checkout(tmp_path, with_venv=False)
  given = stub(tmp_path / "given")
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert reproduce(root, workdir, JAXLM=str(given)).returncode == 0
  assert len((tmp_path / "given" / "calls.log").read_text().splitlines()) == 2
  on_path = stub(tmp_path / "on_path")
  assert reproduce(root, workdir, PATH=f"{on_path.parent}:/usr/bin:/bin").returncode == 0
  assert len((tmp_path / "on_path" / "calls.log").read_text().splitlines()) == 2
  result = reproduce(root, workdir)
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert "no jaxlm: install it in" in result.stderr and ".venv (README.md)" in result.stderr
