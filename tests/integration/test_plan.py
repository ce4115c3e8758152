"""`jaxlm compile --plan`: the planner's estimates and its search on a small slice.

The paper configs' own plans are checked at full depth by benchmarks/fit_paper_configs.py (minutes per
config; a one-layer gpt2_small compile alone took 207 s at load 13, too slow for the suite).

The compiling tests need libtpu (the `test` extra) and skip without it.
"""

import importlib.util
import json

import pytest
from support import REPO

from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.training import plan

TINY = str(REPO / "configs" / "tiny.py")
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: pip install -e '.[test]'"
)


def test_estimate_falls_with_remat_and_micro_batches():
  """More rematerialization saves fewer activations; more micro-batches hold fewer rows at once."""
  config = config_lib.load_config_file(str(REPO / "configs" / "gpt2_small.py"))
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  by_policy = [plan.estimate_temporaries(config, mesh, remat, 8, 10**8) for remat in plan.REMAT_POLICIES]
  assert by_policy == sorted(by_policy, reverse=True) and len(set(by_policy)) == 4, by_policy
  by_micro = [plan.estimate_temporaries(config, mesh, "full", micro, 10**8) for micro in (1, 2, 4, 8)]
  assert by_micro == sorted(by_micro, reverse=True) and len(set(by_micro)) == 4, by_micro


def test_mesh_layouts_split_the_batch_and_the_weights():
  config = config_lib.load_config_file(TINY)  # batch 8, 4 heads, vocabulary 260
  layouts = plan.mesh_layouts(config, 8)
  assert {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1} in layouts
  assert {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1} in layouts
  assert {"data": 1, "fsdp": 2, "expert": 1, "tensor": 4} in layouts
  assert all(layout["tensor"] <= 4 for layout in layouts)  # 4 heads do not split 8 ways
  gpt2 = config_lib.load_config_file(str(REPO / "configs" / "gpt2_small.py"))
  assert all(layout["tensor"] == 1 for layout in plan.mesh_layouts(gpt2, 8))  # a vocabulary of 50257 is odd


@needs_libtpu
@pytest.mark.slow  # 61 s at load 13 on 2 cores: one setup per layout, two compiles
def test_plan_finds_what_fits_and_its_flags_compile(tmp_path, capsys):
  """The plan picked was compiled and fits; its printed flags, passed to `jaxlm compile`, compile to the same
  layout and peak."""
  out = tmp_path / "plan.json"
  status = main.main(["compile", "--config", TINY, "--topology", "v5e-4", "--plan", "--json", str(out)])
  printed = capsys.readouterr().out
  assert status == 0, printed
  found = json.loads(out.read_text())
  picked = found["picked"]
  assert picked["result"] == "fits" and picked["report"]["peak_bytes"] <= found["hbm_bytes"] == 16 * 1024**3
  assert 1 <= found["compiles"] <= 4 and len(found["candidates"]) > found["compiles"]
  flags = printed.split("use it with: ")[1].split()
  assert flags == found["overrides"]
  again = tmp_path / "again.json"
  assert main.main(["compile", "--config", TINY, "--topology", "v5e-4", *flags, "--json", str(again)]) == 0
  report = json.loads(again.read_text())
  assert report["mesh"] == picked["mesh"] and report["peak_bytes"] == picked["report"]["peak_bytes"]


@needs_libtpu
def test_no_layout_splits_the_batch_one_line(capsys):
  """One head cannot split over tensor, so every layout puts 4 chips on the batch, and 3 rows do not split 4 ways."""
  args = ["--config.train.global_batch_size=3", "--config.model.num_heads=1", "--plan"]
  assert main.main(["compile", "--config", TINY, "--topology", "v5e-4", *args]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--plan" in err and "global_batch_size" in err, err
