"""Every expected error derives from `jaxlm.errors.JaxlmError`, which the `jaxlm` command turns into one line."""

import argparse
import importlib
import inspect
import pkgutil

import pytest

import jaxlm
from jaxlm.cli import commands
from jaxlm.errors import JaxlmError

# Errors that are not the command's to report: a bad HTTP request, which the server answers with status 400.
NOT_EXPECTED_BY_THE_CLI = {"RequestError"}


def error_classes() -> dict[str, type]:
  """'module.Class' -> class, for every exception class defined in a jaxlm module."""
  found = {}
  for module_info in pkgutil.walk_packages(jaxlm.__path__, "jaxlm."):
    if module_info.name == "jaxlm.__main__":
      continue
    module = importlib.import_module(module_info.name)
    for name, value in vars(module).items():
      if (
        inspect.isclass(value)
        and issubclass(value, Exception)
        and value.__module__ == module_info.name
        and not name.startswith("_")
      ):
        found[f"{module_info.name}.{name}"] = value
  return found


def test_every_public_jaxlm_error_is_a_jaxlm_error():
  classes = error_classes()
  # The ones the command caught by a hand-written list before it caught JaxlmError.
  for name in (
    "ConfigError",
    "CheckpointError",
    "RunError",
    "TrainingError",
    "DecodeError",
    "ConvertError",
    "PlotError",
    "QuantizeError",
    "LockError",
    "DistributedError",
    "StorageError",
  ):
    assert any(key.endswith("." + name) for key in classes), name
  outside = sorted(
    name
    for name, cls in classes.items()
    if not issubclass(cls, JaxlmError) and cls.__name__ not in NOT_EXPECTED_BY_THE_CLI
  )
  assert outside == [], f"derive these from jaxlm.errors.JaxlmError: {outside}"


def test_expected_errors_keep_their_builtin_bases():
  """`except ValueError` / `except RuntimeError` written before the common base still catch them."""
  classes = error_classes()
  assert issubclass(classes["jaxlm.errors.ConfigError"], ValueError)
  assert issubclass(classes["jaxlm.storage.checkpoint.CheckpointError"], RuntimeError)
  assert issubclass(classes["jaxlm.parallel.distributed.DistributedError"], RuntimeError)


@pytest.mark.parametrize("error", [JaxlmError("a bad thing; do this"), FileNotFoundError("x.txt not found")])
def test_the_command_prints_an_expected_error_in_one_line(error, monkeypatch, capsys):
  def fail(args, overrides):
    raise error

  monkeypatch.setitem(commands.COMMANDS, "config", fail)
  assert commands.run(argparse.Namespace(command="config"), []) == 2
  assert capsys.readouterr().err == f"jaxlm: error: {error}\n"


def test_other_errors_are_not_swallowed(monkeypatch):
  def fail(args, overrides):
    raise KeyError("a bug")

  monkeypatch.setitem(commands.COMMANDS, "config", fail)
  with pytest.raises(KeyError):
    commands.run(argparse.Namespace(command="config"), [])


def test_a_kernel_the_platform_lacks_is_one_line(capfd, tmp_path):
  # `ops.dispatch.choose` runs while the step is traced, deep under JAX's frames: its error must still be one line.
  from support import TINY, error_line, run_in_process

  result = run_in_process(
    ["train", "--config", TINY, "--workdir", str(tmp_path / "run"), "--config.model.attention_impl=cudnn"], capfd
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "model.attention_impl='cudnn' runs on gpu" in error_line(result) and "Traceback" not in result.stderr
