"""Sharding helpers that run before anything compiles."""

import pytest
from support import tiny_config

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
