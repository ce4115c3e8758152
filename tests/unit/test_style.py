"""The code's style is checked, not hoped for: ruff's linter and formatter (pinned in the test extra) pass."""

import subprocess
import sys

from support import REPO


def ruff(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, "--no-cache", "."], capture_output=True, text=True, cwd=REPO, timeout=300
  )


def test_ruff_lint_passes():
  result = ruff("check")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_ruff_format_leaves_every_file_as_it_is():
  result = ruff("format", "--check")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
