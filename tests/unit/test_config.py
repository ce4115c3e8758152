"""Config validation: every bad value gives one line naming the key, exit status 2, before compiling."""

import math
import re

import pytest
from support import REPO, tiny_config

from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.config import schema

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
  # The cases of issue 11 §3 that gave tracebacks, late crashes or were accepted silently.
  (["--config.data.seq_len=0"], "data.seq_len"),
  (["--config.data.seq_len=-1"], "data.seq_len"),
  (["--config.model.head_dim=-8"], "model.head_dim"),
  (["--config.data.prefetch_threads=-3"], "data.prefetch_threads"),
  (['--config.mesh.rules=[["batch", "nope"]]'], "mesh.rules"),
  (['--config.mesh.rules={"batch": 1}'], "mesh.rules"),
  (["--config.data.val_fraction=0.0"], "data.val_fraction"),
  (["--config.eval.batch_size=0"], "eval.batch_size"),
  (["--config.optim.learning_rate=-0.001"], "optim.learning_rate"),
  (["--config.data.val_fraction=1.5"], "data.val_fraction"),
  (["--config.optim.warmup_steps=-5"], "optim.warmup_steps"),
  (["--config.train.stop_at_step=-1"], "train.stop_at_step"),
  (["--config.model.dropout_rate=2.0"], "model.dropout_rate"),
  (["--config.optim.b2=1.5"], "optim.b2"),
  (["--config.train.eval_batches=0"], "train.eval_batches"),
  (["--config.optim.learning_rate=nan"], "optim.learning_rate"),
  (["--config.optim.learning_rate=inf"], "optim.learning_rate"),
  # More of our own.
  (["--config.optim.b1=-0.1"], "optim.b1"),
  (["--config.optim.eps=-1e-8"], "optim.eps"),
  (["--config.train.label_smoothing=1.0"], "train.label_smoothing"),
  (["--config.train.keep_checkpoints=0"], "train.keep_checkpoints"),
  (["--config.model.norm_eps=0.0"], "model.norm_eps"),
  (["--config.mesh.tensor=0"], "mesh"),
  (["--config.distributed.heartbeat_timeout_s=0"], "distributed.heartbeat_timeout_s"),
  (["--config.seed=-1"], "seed"),
  (["--config.train.learning_rate=0.1"], "optim.learning_rate"),  # did you mean
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
  bad.write_text(
    "from jaxlm.config import base_config\ndef get_config():\n  c = base_config()\n  c.model.dmodel = 3\n  return c\n"
  )
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
  c = config_lib.apply_overrides(
    tiny_config(),
    [
      "--config.model.num_layers=3",
      "--config.optim.learning_rate=1",
      "--config.model.norm=rmsnorm",
      "--config.model.scan_layers=True",
    ],
  )
  assert c.model.num_layers == 3 and isinstance(c.optim.learning_rate, float)
  assert c.model.norm == "rmsnorm" and c.model.scan_layers is True


def test_mesh_fills_free_axis():
  c = tiny_config()
  c.mesh.fsdp, c.mesh.tensor = 2, 2
  assert config_lib.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  config_lib.validate(c, 8)


def test_every_repo_config_passes_the_schema():
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.name.startswith("_"):
      continue
    config_lib.load_config_file(str(path))


def test_every_schema_key_has_its_allowed_values():
  missing = [
    key
    for key, _ in config_lib.leaves(config_lib.base_config())
    if key not in config_lib.RANGES and key not in schema._CHOICES and key not in schema._REGISTERED
  ]
  assert not missing, f"add these keys to config.RANGES (or _CHOICES): {missing}"
  for key, value in config_lib.leaves(config_lib.base_config()):
    assert config_lib.allowed(key).accepts(value), f"the default of {key} is outside its own range"


def test_nan_is_writable_and_rejected():
  c = config_lib.apply_overrides(tiny_config(), ["--config.optim.learning_rate=nan"])
  assert math.isnan(c.optim.learning_rate)
  with pytest.raises(config_lib.ConfigError, match=r"'optim.learning_rate' is nan; it must be a finite number, > 0"):
    config_lib.validate(c, 8)


@pytest.mark.parametrize(
  "name,text,expected",
  [
    ("syntax.py", "def get_config(:\n  pass\n", r"syntax.py, line 1: syntax error"),
    (
      "raises.py",
      "from jaxlm.config import base_config\n\ndef get_config():\n  c = base_config()\n"
      "  c.model.num_layers = 1 / 0\n  return c\n",
      r"raises.py, line 5: get_config\(\) raised ZeroDivisionError",
    ),
    ("imports.py", "import not_a_module_anywhere\n", r"imports.py, line 1: ModuleNotFoundError"),
    ("notes.txt", "model.num_layers = 2\n", r"notes.txt' is not a Python file"),
    ("config.json", "{}", r"config.json' is not a Python file"),
    ("returns.py", "def get_config():\n  return {}\n", r"returned dict, not a ConfigDict"),
  ],
)
def test_config_file_errors_name_the_file_and_line(name, text, expected, capsys, tmp_path):
  path = tmp_path / name
  path.write_text(text)
  assert main.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert re.search(expected, err), err


def test_unknown_key_suggests_the_nearest(capsys, tmp_path):
  assert main.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--config.model.num_layer=3"]) == 2
  assert "did you mean `model.num_layers`?" in capsys.readouterr().err


def test_override_with_a_space_points_to_the_equals_form(capsys, tmp_path):
  assert main.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--config.model.num_layers", "6"]) == 2
  err = capsys.readouterr().err
  assert "--config.model.num_layers=6 (with '=')" in err and "unrecognized" not in err


def test_missing_prompt_file_names_the_flag(capsys, tmp_path):
  assert main.main(["generate", "--workdir", str(tmp_path), "--prompt-file", str(tmp_path / "nope.txt")]) == 2
  err = capsys.readouterr().err
  assert "--prompt-file" in err and "nope.txt" in err and "Errno" not in err


def test_train_help_mentions_overrides(capsys):
  with pytest.raises(SystemExit):
    main.main(["train", "--help"])
  out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
  assert "--config.KEY=VALUE" in out and "jaxlm config show" in out


def test_config_show_lists_every_key_with_range_comment_and_changes(capsys):
  overrides = ["--config.optim.learning_rate=0.01", "--config.model.d_model=32"]
  assert main.main(["config", "show", TINY, *overrides]) == 0
  out = capsys.readouterr().out.splitlines()
  rows = {line[2:].split()[0]: line for line in out[2:]}
  assert set(rows) == {key for key, _ in config_lib.leaves(config_lib.base_config())}
  # `*`: an override changes the file's value (learning_rate; d_model=32 is what configs/tiny.py sets already);
  # `+`: configs/tiny.py sets it away from the default (num_layers=2, default 4); seed keeps its default.
  assert rows["optim.learning_rate"].startswith("* ") and rows["model.d_model"].startswith("+ ")
  assert rows["model.num_layers"].startswith("+ ") and rows["seed"].startswith("  ")
  assert "* marks the 1 that --config overrides change from" in out[0]
  assert ">= 1" in rows["model.num_layers"] and "0.01" in rows["optim.learning_rate"]
  assert "layernorm | rmsnorm" in rows["model.norm"]
  assert "0 means num_heads" in rows["model.num_kv_heads"]  # the schema's comment
  assert out[0].startswith(f"{TINY}: {len(rows)} keys; ")


def test_workdir_has_help_and_generate_shows_its_defaults(capsys):
  for command in ("train", "generate"):
    with pytest.raises(SystemExit):
      main.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--workdir WORKDIR the run directory" in out, out
  # Every option with a value has its default said once; flags (--int8) and defaults already said are left.
  assert "--max-tokens MAX_TOKENS the most tokens to generate (default: 128)" in out
  assert "--temperature TEMPERATURE 0 is greedy (default: 0.0)" in out and "(default: 1.0)" in out
  assert "checkpoint step (default: latest)" in out and out.count("default") == out.count("(default:")
  assert "--int8 int8 weight-only quantized weights (see `jaxlm quantize`) --mesh" in out
