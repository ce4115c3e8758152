"""The registries own their choices: a family, an attention implementation and a data source defined here,
outside jaxlm, are accepted by the config and trained like the built-in ones, and unknown names are refused
with the registered choices listed."""

import ast
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

import jaxlm
from jaxlm import config as config_lib
from jaxlm import families
from jaxlm.data import sources
from jaxlm.ops import dispatch, register_attention

PACKAGE = Path(__file__).resolve().parents[2] / "jaxlm"
REGISTRIES = {PACKAGE / "families" / "__init__.py", PACKAGE / "data" / "sources.py"}

traced = []  # one entry per trace of `plain_attention`: proof that the model ran it


def plain_attention(
  q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask_Bx1xTxS, q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg
):
  """softmax(q k^T / sqrt(H), masked) v, written out: an attention implementation from outside jaxlm."""
  del q_segment_ids_BxT, kv_segment_ids_BxS, causal, model_cfg  # the mask already says what each query sees
  traced.append(q_BxTxNxH.shape)
  group = q_BxTxNxH.shape[2] // k_BxSxKxH.shape[2]
  k_BxSxNxH, v_BxSxNxH = jnp.repeat(k_BxSxKxH, group, axis=2), jnp.repeat(v_BxSxKxH, group, axis=2)
  logits_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxSxNxH) / math.sqrt(q_BxTxNxH.shape[-1])
  logits_BxNxTxS = jnp.where(mask_Bx1xTxS.astype(bool), logits_BxNxTxS, jnp.finfo(logits_BxNxTxS.dtype).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits_BxNxTxS, axis=-1), v_BxSxNxH)


def counting_documents(data_config, split: str) -> list[bytes]:
  """A data source's reader from outside jaxlm: lines of counting, a different stretch for each split."""
  first = 0 if split == "train" else 5000
  return [" ".join(str(n) for n in range(start, start + 40)).encode() for start in range(first, first + 2000, 40)]


def check_counting(config) -> None:
  if config.data.val_fraction > 0.5:
    raise config_lib.ConfigError("data.source='counting' holds out no more than half; lower data.val_fraction")


@pytest.fixture
def registered():
  """A family, an attention implementation and a data source of this module, registered for one test."""
  family = families.register(dataclasses.replace(families.get("decoder"), name="decoder_twin"))
  register_attention("plain", plain_attention)
  source = sources.register(
    sources.Source(
      name="counting", documents=counting_documents, families=("decoder", "decoder_twin"), check=check_counting
    )
  )
  traced.clear()
  try:
    yield family, source
  finally:
    families._REGISTRY.pop(family.name)
    dispatch.REGISTRY["attention"].pop("plain")
    sources._REGISTRY.pop(source.name)


def registered_config():
  c = tiny_config(family="decoder_twin", attention_impl="plain")
  c.data.source = "counting"
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 2, 2, 2
  return c


def test_what_is_registered_outside_jaxlm_is_validated_and_trained(registered, tmp_path):
  config = registered_config()
  config_lib.validate(config, jax.device_count())
  metrics = jaxlm.train(config, tmp_path)
  assert np.isfinite(metrics["loss"])
  assert traced, "the registered attention implementation never ran"
  assert jaxlm.load(tmp_path).config.model.family == "decoder_twin"


@pytest.mark.parametrize(
  "key, value, registered_name",
  [
    ("model.family", "nope", "decoder_twin"),
    ("model.attention_impl", "nope", "plain"),
    ("data.source", "nope", "counting"),
  ],
)
def test_an_unregistered_name_is_refused_with_the_choices(registered, key, value, registered_name):
  config = config_lib.apply_overrides(registered_config(), [f"--config.{key}={value}"])
  with pytest.raises(config_lib.ConfigError, match=f"config key '{key}' is 'nope'; choose one of ") as error:
    config_lib.validate(config, jax.device_count())
  assert registered_name in str(error.value).split("choose one of ")[1].split(", ")


def test_a_registered_source_checks_its_config_and_the_families_it_feeds(registered):
  config = registered_config()
  config.data.val_fraction = 0.9
  with pytest.raises(config_lib.ConfigError, match="holds out no more than half"):
    config_lib.validate(config, jax.device_count())
  config = registered_config()
  config.model.family, config.model.norm_position = "encoder", "post"
  with pytest.raises(
    config_lib.ConfigError,
    match="data.source='counting' feeds the decoder or decoder_twin family, not model.family='encoder'",
  ):
    config_lib.validate(config, jax.device_count())


def test_the_built_in_choices_come_from_the_registries():
  assert set(config_lib.allowed("model.family").choices) == set(families.names()) >= {"decoder", "encoder_qa"}
  assert config_lib.allowed("model.attention_impl").choices == ("xla", "cudnn", "splash", "triton")
  assert set(config_lib.allowed("data.source").choices) == {
    "stdlib",
    "files",
    "tfds",
    "codesum",
    "prepared",
    "jsonl",
    "squad",
    "stdlib_packages",
  }


def test_the_weight_free_marks_name_schema_keys():
  model_keys = set(config_lib.base_config().model)
  assert set(config_lib.WEIGHTS_FREE) <= model_keys
  assert set(config_lib.WEIGHTS_FREE.values()) == {"runtime", "task", "storage", "size"}


def string_comparisons(tree: ast.AST) -> list[int]:
  """Lines comparing something named `family` or `source` (`x.family`, `d["source"]`, `family`) with ==, !=, in
  or not in to a string or a collection of strings."""

  def named(node) -> bool:
    if isinstance(node, ast.Attribute):
      return node.attr in ("family", "source")
    if isinstance(node, ast.Subscript):
      return isinstance(node.slice, ast.Constant) and node.slice.value in ("family", "source")
    return isinstance(node, ast.Name) and node.id in ("family", "source")

  def strings(node) -> bool:
    if isinstance(node, ast.Constant):
      return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(strings, node.elts))

  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
      operands = [node.left, *node.comparators]
      if any(map(named, operands)) and any(map(strings, operands)):
        lines.append(node.lineno)
  return lines


def test_the_scan_finds_a_comparison():
  assert string_comparisons(ast.parse("if config.data.source == 'files' or m.family in ('a', 'b'): pass")) == [1, 1]
  assert string_comparisons(ast.parse("if plan['source'] != 'tfds': pass")) == [1]
  assert string_comparisons(ast.parse("if source.name == name or key == 'data.source': pass")) == []


def test_no_family_or_source_is_compared_to_a_name_outside_the_registries():
  found = [
    f"{path.relative_to(PACKAGE.parent)}:{line}"
    for path in sorted(PACKAGE.rglob("*.py"))
    if path not in REGISTRIES
    for line in string_comparisons(ast.parse(path.read_text()))
  ]
  assert not found, "look the family or data source up in its registry instead: " + ", ".join(found)
