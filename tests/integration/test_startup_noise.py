"""A failed command prints one line, also where libtpu is installed on a host without TPU chips.

The test extra installs libtpu (to compile for TPU slices), and JAX starts it as a candidate backend in every
process; on a host without chips it wrote 5-7 lines to stderr first, until `jaxlm.runtime.skip_tpu_backend_without_tpu`
(applied by the `jaxlm` command). Each case runs `jaxlm` in a fresh process, as a user does, with JAX_PLATFORMS
unset (the suite itself never sets it): most of them fail after JAX has looked for its devices.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, TINY, xla_flags


def error_cases(folder: Path) -> list[list[str]]:
  """20 different bad commands, with the files they need made in `folder`."""
  no_steps, a_file, hf_dir = folder / "no_steps", folder / "a_file", folder / "hf"
  no_steps.mkdir()
  a_file.write_text("x")
  hf_dir.mkdir()
  train = ["train", "--config", TINY, "--workdir", str(folder / "run")]
  return [
    [*train, "--config.mesh.data=3"],  # 3 devices asked, 8 present
    [*train, "--config.train.global_batch_size=7"],
    [*train, "--config.model.attention_impl=splash"],  # its tiles do not fit seq_len 32
    [*train, "--config.model.num_heads=5"],
    [*train, "--config.data.source=files", f"--config.data.paths={folder}/none/*.txt"],
    [*train, "--config.distributed.num_processes=2"],  # no coordinator
    ["train", "--config", TINY, "--workdir", str(a_file)],
    ["train", "--config", str(folder / "missing.py"), "--workdir", str(folder / "run")],
    ["generate", "--workdir", str(folder / "run"), "--prompt", "x", "--mesh", "data=64"],
    ["serve", "--workdir", str(folder / "run"), "--mesh", "tensor=64"],
    ["export", "--workdir", str(folder / "run"), "--out", str(folder / "export"), "--mesh", "fsdp=64"],
    ["generate", "--workdir", str(folder / "missing"), "--prompt", "x"],
    ["plot", str(folder / "missing"), "--out", str(folder / "loss.png")],
    ["eval", "--workdir", str(no_steps)],
    ["quantize", "--workdir", str(folder / "missing")],
    ["verify", "--workdir", str(folder / "missing")],
    ["convert", "--from-hf", str(hf_dir), "--workdir", str(folder / "converted")],
    ["compile", "--config", TINY, "--topology", "v5e:3x3"],
    ["devices", "--config", TINY, "--config.model.bogus=1"],
    ["config", "show", TINY, "--config.optim.learning_rate=fast"],
  ]


@pytest.mark.slow
def test_twenty_failed_commands_each_print_one_line(tmp_path):
  env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = xla_flags(8)
  cases = error_cases(tmp_path)
  assert len({tuple(case) for case in cases}) == 20
  for case in cases:
    result = subprocess.run(
      [sys.executable, "-m", "jaxlm", *case], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("jaxlm: error:"), (
      f"jaxlm {' '.join(case)}: exit {result.returncode}\n{result.stderr[-3000:]}"
    )
