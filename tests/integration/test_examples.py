"""examples/: each script is under 15 lines, uses jaxlm's public names only, and runs (tiny configs)."""

import ast
import os
import subprocess
import sys

import pytest
from support import REPO, xla_flags

import jaxlm
from jaxlm import loader
from jaxlm.models import layers
from jaxlm.storage import checkpoint

EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def code_lines(path) -> int:
  """Non-blank lines, the module docstring excluded."""
  tree = ast.parse(path.read_text())
  docstring_end = tree.body[0].end_lineno if ast.get_docstring(tree) else 0
  return sum(1 for line in path.read_text().splitlines()[docstring_end:] if line.strip())


def jaxlm_names(path) -> tuple[set[str], set[str]]:
  """(modules imported from jaxlm, attributes read as jaxlm.X) in a script."""
  modules, attributes = set(), set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      modules.update(a.name for a in node.names if a.name.startswith("jaxlm"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxlm"):
      modules.add(node.module)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "jaxlm":
      attributes.add(node.attr)
  return modules, attributes


def run_example(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  result = subprocess.run(
    [sys.executable, str(REPO / "examples" / name), *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_examples_are_short_and_use_public_names_only():
  assert {p.name for p in EXAMPLES} >= {
    "custom_block.py",
    "score_run.py",
    "attention_weights.py",
    "mesh_fsdp_tensor.py",
  }
  for path in EXAMPLES:
    assert code_lines(path) < 15, path.name
    modules, attributes = jaxlm_names(path)
    assert modules == {"jaxlm"}, (path.name, modules)
    assert attributes <= set(jaxlm.__all__), (path.name, attributes - set(jaxlm.__all__))


@pytest.mark.slow
def test_custom_block_trains_then_resumes(tmp_path):
  result = run_example("custom_block.py", str(tmp_path))
  assert "resumed from step 4" in result.stderr
  assert checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [4, 8]
  # The checkpoint holds the parallel block's parameters (one norm per layer), not the default block's.
  model_cfg = loader.load_config(tmp_path).model
  assert jaxlm.load(tmp_path, model=jaxlm.DecoderLM(model_cfg, block_cls=layers.ParallelBlock)).step == 8
  with pytest.raises(loader.RunError, match=r"jaxlm.load\(workdir, model=that_module\)"):
    jaxlm.load(tmp_path)  # the family's default block: the error names `model=`


@pytest.mark.slow
def test_score_run_and_attention_weights_on_a_cli_run(cli_run):
  workdir, _ = cli_run
  score = run_example("score_run.py", str(workdir), "import os\n").stdout
  assert score.startswith("step 6: ") and score.strip().endswith("bits per byte")
  assert 0 < float(score.split()[2]) < 12
  weights = run_example("attention_weights.py", str(workdir)).stdout
  assert weights.startswith("(1, 4, 20, 20)")  # B x heads x T x S for the 20-byte prompt


@pytest.mark.slow
def test_mesh_fsdp_tensor(tmp_path):
  out = run_example("mesh_fsdp_tensor.py", str(tmp_path)).stdout
  assert "{'data': 1, 'fsdp': 4, 'expert': 1, 'tensor': 2} P('fsdp', 'tensor')" in out  # P: PartitionSpec's repr
