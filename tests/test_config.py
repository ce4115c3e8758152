"""Config validation: every bad value gives one line naming the key, exit status 2, before compiling."""

import pytest

from jaxlm import config as config_lib
from jaxlm import main

from conftest import REPO, tiny_config

TINY = str(REPO / "configs" / "tiny.py")

BAD_OVERRIDES = [
    (["--config.model.num_layrs=3"], "model.num_layrs"),
    (["--config.model.num_layers=abc"], "model.num_layers"),
    (["--config.model.num_layers=2.5"], "model.num_layers"),
    (["--config.model.d_model=30"], "model.d_model"),
    (["--config.model.num_kv_heads=3"], "model.num_kv_heads"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.mesh.fsdp=3"], "mesh"),
    (["--config.train.global_batch_size=12"], "train.global_batch_size"),
    (["--config.data.seq_len=128"], "data.seq_len"),
    (["--config.data.source=files", "--config.data.paths=/nonexistent/*.txt"], "data.paths"),
    (["--config.data.source=files"], "data.paths"),
    (["--config.model.norm=batchnorm"], "model.norm"),
    (["--config.mesh.rules=[oops"], "mesh.rules"),
    (["--config.model.vocab_size=100"], "model.vocab_size"),
]


@pytest.mark.parametrize("overrides,key", BAD_OVERRIDES)
def test_bad_config_is_one_line_naming_the_key(overrides, key, capsys, tmp_path):
  status = main.main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), *overrides])
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert len(err.splitlines()) == 1, err
  assert key in err and "Traceback" not in err
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing ran


def test_missing_config_file(capsys, tmp_path):
  assert main.main(["train", "--config", "configs/nope.py", "--workdir", str(tmp_path)]) == 2
  assert "configs/nope.py" in capsys.readouterr().err


def test_unknown_key_in_config_file(capsys, tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from jaxlm.config import base_config\n"
                 "def get_config():\n  c = base_config()\n  c.model.dmodel = 3\n  return c\n")
  assert main.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "run")]) == 2
  assert "model.dmodel" in capsys.readouterr().err


def test_unknown_cli_argument(capsys):
  assert main.main(["eval", "--workdir", "x", "--stepp", "3"]) == 2
  assert "--stepp" in capsys.readouterr().err


def test_eval_without_a_run(capsys, tmp_path):
  assert main.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "config.json" in err and len(err.strip().splitlines()) == 1


def test_overrides_keep_types():
  c = config_lib.apply_overrides(tiny_config(), ["--config.model.num_layers=3", "--config.optim.learning_rate=1",
                                                 "--config.model.norm=rmsnorm", "--config.model.scan_layers=True"])
  assert c.model.num_layers == 3 and isinstance(c.optim.learning_rate, float)
  assert c.model.norm == "rmsnorm" and c.model.scan_layers is True


def test_mesh_fills_free_axis():
  c = tiny_config()
  c.mesh.fsdp, c.mesh.tensor = 2, 2
  assert config_lib.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  config_lib.validate(c, 8)


def test_every_repo_config_passes_the_schema():
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.name.startswith("_"):
      continue
    config_lib.load_config_file(str(path))
