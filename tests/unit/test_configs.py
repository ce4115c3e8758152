"""Every configs/*.py builds abstractly (jax.eval_shape: no allocation), matches its paper's parameter
count within 3%, and passes config.validate for a plausible device count."""

import importlib.util
import math
from pathlib import Path

import jax
import pytest

from jaxlm import config as config_lib
from jaxlm.models import transformer as model_lib

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.py"))


def _module(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _num_params(config) -> int:
  m = config.model
  model = model_lib.build(m)
  batch = model_lib.example_batch(m, (1, 8))
  shapes = jax.eval_shape(lambda rng: model.init(rng, **model_lib.model_inputs(m, batch)), jax.random.key(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_validates(path):
  module = _module(path)
  config = config_lib.load_config_file(str(path))
  # 8 devices (a v4-8 / one GPU host) must work for every config: batch sizes are multiples of 8.
  config_lib.validate(config, 8)
  params = _num_params(config)
  assert params > 0
  paper = getattr(module, "PAPER_PARAMS", None)
  if paper:
    assert abs(params - paper) / paper < 0.03, f"{path.stem}: {params / 1e6:.1f}M vs paper {paper / 1e6:.1f}M"


def test_every_paper_config_states_its_figure():
  """Configs named after a paper declare the paper's parameter count, so the test above checks them."""
  for path in CONFIGS:
    if path.stem.startswith(("gpt2_", "gpt3_", "transformer_", "bert_", "llama_")):
      assert getattr(_module(path), "PAPER_PARAMS", None), path.stem


def test_docstrings_name_command_hardware_time_expected():
  """Every config is a runnable experiment record."""
  for path in CONFIGS:
    doc = _module(path).__doc__ or ""
    for field in ("Command:", "Hardware:", "Time:", "Expected:"):
      assert field in doc, f"{path.name} docstring lacks {field}"
