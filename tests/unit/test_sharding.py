"""Sharding helpers that run before anything compiles, and what the partitioner makes of the model's layout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_config, xla_flags

from jaxlm import config as config_lib
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import step as train_step


def test_a_state_too_big_for_the_device_is_refused_before_compiling():
  config = tiny_config()
  s = train_step.setup(config, mesh_lib.make_mesh(config))
  sharding.check_state_fits(s.abstract_state, s.state_shardings, s.abstract_state.params)  # a tiny model fits
  config.model.max_len = 1_000_000_000  # a learned position table of 1e9 x 32 floats, three times with Adam
  s = train_step.setup(config, mesh_lib.make_mesh(config))
  with pytest.raises(config_lib.ConfigError, match=r"needs \d+\.\d GiB per device .* model.max_len"):
    sharding.check_state_fits(s.abstract_state, s.state_shardings, s.abstract_state.params)


# Compiles the train step of configs/tiny.py (one layer) on a 2 x 2 x 2 mesh of CPU devices, and nothing else.
_COMPILE_ON_A_3D_MESH = """
import sys
from support import tiny_config
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.training import step as train_step
config = tiny_config(num_layers=1)
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
train_step.compile_train_step(train_step.setup(config, mesh_lib.make_mesh(config)))
"""


def test_the_token_lookup_compiles_on_a_3d_mesh_without_full_rematerialization():
  """The embedding gather and its transpose on a data x fsdp x tensor mesh (vocab on tensor, embed on fsdp):
  without `layers._Embed`'s gather along embed, XLA's SPMD partitioner replicates the looked-up rows. XLA's C++
  prints that warning to fd 2, and a cached executable prints nothing: hence a fresh process, without the cache."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_ENABLE_COMPILATION_CACHE="false")
  env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
  result = subprocess.run(
    [sys.executable, "-c", _COMPILE_ON_A_3D_MESH], capture_output=True, text=True, env=env, timeout=600
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Involuntary full rematerialization" not in result.stderr
