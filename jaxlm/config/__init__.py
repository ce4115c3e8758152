"""Configs: the base schema, loading `configs/*.py`, command-line overrides and validation.

Every config file's `get_config()` starts from `base_config()` and changes
fields, so the base is the schema: a key it lacks is a typo, and a value whose
type differs from the base's is a mistake. Both are caught here, before JAX
compiles anything, with one line that names the key and the fix.

  schema.py   the keys: defaults and comments (`base_config`), allowed values (`RANGES`, `allowed`), and the
              model keys that do not change the weights (`WEIGHTS_FREE`)
  files.py    `load_config_file`, `apply_overrides`, `check_schema`
  checks.py   `validate`, and the values derived from a config (`head_dim`, `mesh_shape`, `mesh_rules`, ...)
  presets.py  paper recipes for `configs/*.py`;  show.py  `jaxlm config show`
"""

from jaxlm.config.checks import (
  data_parallel_size,
  head_dim,
  mesh_rules,
  mesh_shape,
  model_of_run,
  num_kv_heads,
  validate,
)
from jaxlm.config.files import apply_overrides, check_schema, load_config_file, unknown_key_message
from jaxlm.config.schema import (
  DEFAULT_RULES,
  RANGES,
  WEIGHTS_FREE,
  Allowed,
  Config,
  ConfigDict,
  ModelConfig,
  allowed,
  base_config,
  leaves,
  model_keys,
)
from jaxlm.errors import ConfigError

__all__ = [
  "DEFAULT_RULES",
  "RANGES",
  "WEIGHTS_FREE",
  "Allowed",
  "Config",
  "ConfigDict",
  "ConfigError",
  "ModelConfig",
  "allowed",
  "apply_overrides",
  "base_config",
  "check_schema",
  "data_parallel_size",
  "head_dim",
  "leaves",
  "load_config_file",
  "mesh_rules",
  "mesh_shape",
  "model_keys",
  "model_of_run",
  "num_kv_heads",
  "unknown_key_message",
  "validate",
]
