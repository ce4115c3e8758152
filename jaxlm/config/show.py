"""`jaxlm config show CONFIG [--config.KEY=VALUE ...]`: every key, its value, type, allowed values and comment.

The comments are the ones written next to the defaults in
`jaxlm.config.base_config`, read from its source, so the schema stays the one
place that documents a key. A key that a --config.KEY=VALUE override changes
from what the config file sets is marked `*`; one the file itself sets away
from the schema's default is marked `+`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize

from jaxlm import config as config_lib


def _dotted(node: ast.AST) -> str | None:
  """'model.num_layers' for the assignment target `c.model.num_layers`; None for other targets."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == "c" and parts:
    return ".".join(reversed(parts))
  return None


@functools.cache
def schema_comments() -> dict[str, str]:
  """{dotted key: the comment on its line in base_config()}, '' for keys without one."""
  source = textwrap.dedent(inspect.getsource(config_lib.base_config))
  comments = {
    token.start[0]: token.string.lstrip("# ").strip()
    for token in tokenize.generate_tokens(io.StringIO(source).readline)
    if token.type == tokenize.COMMENT
  }
  result = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      key = _dotted(node.targets[0])
      if key is not None and not isinstance(node.value, ast.Call):  # `c.model = ConfigDict()` opens a section
        result[key] = comments.get(node.lineno, "")
  return result


def rows(config, file_config=None) -> list[dict]:
  """One dict per schema key of `config` (a whole ConfigDict).

  Args:
    config: the config shown (the file's, overrides applied).
    file_config: the config file's own, before the overrides; None: the same as `config`.

  Returns:
    Dicts of key, value, type, allowed, comment, overridden (differs from `file_config`) and changed (the
    file's value differs from the schema's default).
  """
  defaults = dict(config_lib.leaves(config_lib.base_config()))
  from_file = dict(config_lib.leaves(config if file_config is None else file_config))
  comments = schema_comments()
  return [
    {
      "key": key,
      "value": value,
      "type": type(defaults[key]).__name__,
      "allowed": config_lib.allowed(key).describe(),
      # A comment that only lists the choices says nothing the 'allowed' column does not.
      "comment": "" if comments.get(key, "") == config_lib.allowed(key).describe() else comments.get(key, ""),
      "overridden": value != from_file.get(key, defaults[key]),
      "changed": from_file.get(key, defaults[key]) != defaults[key],
    }
    for key, value in config_lib.leaves(config)
  ]


def format_table(config, source: str, file_config=None) -> str:
  """The table `jaxlm config show` prints.

  Args:
    config: the config shown, overrides applied.
    source: the config file's name, for the header.
    file_config: the file's config before the overrides (None: no overrides).

  Returns:
    The header, then one line per key.
  """
  table = rows(config, file_config)
  key_width = max(len(r["key"]) for r in table)
  value_width = min(max(len(repr(r["value"])) for r in table), 24)
  allowed_width = min(max(len(r["allowed"]) for r in table), 34)
  overridden, changed = sum(r["overridden"] for r in table), sum(r["changed"] for r in table)
  lines = [
    f"{source}: {len(table)} keys; * marks the {overridden} that --config overrides change from {source}, + the "
    f"{changed} that {source} sets away from the schema's defaults; set any with --config.KEY=VALUE",
    f"  {'key':<{key_width}}  {'value':<{value_width}}  {'type':<5}  {'allowed':<{allowed_width}}  comment",
  ]
  for r in table:
    lines.append(
      f"{'*' if r['overridden'] else '+' if r['changed'] else ' '} {r['key']:<{key_width}}  {repr(r['value']):<{value_width}}  "
      f"{r['type']:<5}  {r['allowed']:<{allowed_width}}  {r['comment']}".rstrip()
    )
  return "\n".join(lines)
