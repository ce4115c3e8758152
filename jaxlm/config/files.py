"""Loading configs: running a `configs/*.py` file, applying `--config.KEY=VALUE` overrides, and checking that
every key is in the schema with its type (a missing key is a typo; the message names the nearest one).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

from jaxlm.config.schema import ConfigDict, _get, base_config, leaves
from jaxlm.errors import ConfigError


def _line_in(file: Path, error: BaseException) -> str:
  """'line N' of the innermost traceback frame inside `file`, or '' if the error arose elsewhere."""
  line = ""
  frame = error.__traceback__
  while frame is not None:
    if Path(frame.tb_frame.f_code.co_filename).resolve() == file.resolve():
      line = f"line {frame.tb_lineno}"
    frame = frame.tb_next
  return line


def load_config_file(path: str) -> ConfigDict:
  """Runs `get_config()` of the Python file `path` and schema-checks the result; ConfigError names the file and line."""
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"--config: file '{path}' not found; pass a path such as configs/default.py")
  if file.suffix != ".py":
    raise ConfigError(
      f"--config: '{path}' is not a Python file; pass a configs/*.py file defining get_config() "
      "(a run's saved config.json is read through --workdir by eval, generate and serve)"
    )
  spec = importlib.util.spec_from_file_location(f"jaxlm_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"--config: {path}, line {e.lineno}: syntax error ({e.msg}); fix the file") from None
  except Exception as e:  # noqa: BLE001 - whatever the file raises is reported with its line
    raise ConfigError(
      f"--config: {path}, {_line_in(file, e) or 'at import'}: {type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}; fix the file"
    ) from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: '{path}' has no get_config(); define one returning a ConfigDict")
  try:
    config = module.get_config()
  except Exception as e:  # noqa: BLE001
    where = _line_in(file, e) or "in get_config()"
    raise ConfigError(
      f"--config: {path}, {where}: get_config() raised {type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}; fix the file"
    ) from None
  if not isinstance(config, ConfigDict):
    raise ConfigError(
      f"--config: get_config() in {path} returned {type(config).__name__}, not a ConfigDict; "
      "start from jaxlm.config.base_config()"
    )
  check_schema(config)
  return config


def unknown_key_message(key: str) -> str:
  """One line for a key the schema lacks, with the closest schema keys as suggestions."""
  names = [name for name, _ in leaves(base_config())]
  close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
  if not close:  # a right leaf under a wrong section, e.g. 'train.learning_rate'
    close = [name for name in names if name.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
  hint = f"did you mean `{close[0]}`?" if close else "`jaxlm config show CONFIG` lists every key"
  return f"config key '{key}' is unknown; {hint}"


def _type_ok(expected, value) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(expected, bool) and isinstance(value, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(expected))


def check_schema(config: ConfigDict) -> None:
  """Every key exists in the base schema and has its type."""
  base = base_config()
  for name, value in leaves(config):
    try:
      expected = _get(base, name)
    except KeyError:
      raise ConfigError(unknown_key_message(name)) from None
    if not _type_ok(expected, value):
      raise ConfigError(f"config key '{name}' must be {type(expected).__name__}, got {value!r}; fix the value")


_NON_FINITE = ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "-infinity")


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
  """Applies `--config.a.b=value` arguments to `config` (the whole config) and returns it; values parse as
  Python literals. (`jaxlm train` then checks model overrides against a `train.init_from` run: init_from.py.)"""
  base = base_config()
  for arg in overrides:
    if "=" not in arg:
      raise ConfigError(f"override '{arg}' has no value; write it as {arg}=VALUE (with '=', not a space)")
    key, text = arg[len("--config.") :].split("=", 1)
    try:
      expected = _get(base, key)
    except KeyError:
      raise ConfigError(unknown_key_message(key)) from None
    if isinstance(expected, str):
      value = text
    else:
      try:
        # float() first: it reads nan and inf, which literal_eval cannot, so validation can name them.
        value = (
          float(text) if isinstance(expected, float) and text.strip().lower() in _NON_FINITE else ast.literal_eval(text)
        )
      except (ValueError, SyntaxError):
        raise ConfigError(
          f"config key '{key}' must be {type(expected).__name__}, got '{text}'; fix the value"
        ) from None
    if not _type_ok(expected, value):
      raise ConfigError(f"config key '{key}' must be {type(expected).__name__}, got '{text}'; fix the value")
    parent, _, leaf = key.rpartition(".")
    node = _get(config, parent) if parent else config
    with node.ignore_type():
      node[leaf] = type(expected)(value)
  return config
