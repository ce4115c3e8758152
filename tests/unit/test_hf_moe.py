"""Hugging Face interop for sparse MoE (MixtralForCausalLM): logits and greedy generation equal HF's both ways, on
random models with odd shapes built offline, and every difference is named."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from support import tiny_config

from jaxlm import hf
from jaxlm.inference import decode
from jaxlm.models import transformer as model_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd on purpose: head_dim 8 from D=40 over 5 heads, one key/value head, 3 experts of width 24, a vocabulary of 263.
MIXTRAL = dict(
  vocab_size=263,
  hidden_size=40,
  intermediate_size=24,
  num_hidden_layers=2,
  num_attention_heads=5,
  num_key_value_heads=1,
  num_local_experts=3,
  num_experts_per_tok=2,
  max_position_embeddings=64,
  rope_theta=10000.0,
)
# The same model as a jaxlm config (for export).
MOE = dict(
  vocab_size=263,
  d_model=40,
  num_heads=5,
  num_kv_heads=1,
  mlp_dim=24,
  norm="rmsnorm",
  position="rope",
  mlp="swiglu",
  use_bias=False,
  tie_embeddings=False,
  moe_experts=3,
  moe_top_k=2,
  moe_hidden=24,
  moe_dispatch="dropless",
)
TOKENS = np.random.default_rng(0).integers(4, 263, (2, 24))
PROMPTS = [[5, 17, 200, 9], [260, 3, 3, 41, 8, 99]]


def hf_mixtral(directory):
  """A random MixtralForCausalLM saved to `directory`, every weight perturbed so that no mapping hides behind an
  exact init (norms start at one)."""
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def jax_logits(config, params):
  return np.asarray(jax.jit(model_lib.build(config.model).apply)({"params": params}, jnp.asarray(TOKENS)))


def hf_greedy(model, prompt, new_tokens):
  """HF `generate`'s greedy continuation of one prompt, never stopping early (no end-of-text token)."""
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
  return out[0, len(prompt) :].tolist()


def test_mixtral_import_matches_hf_logits_and_greedy(tmp_path):
  model = hf_mixtral(tmp_path)
  config, params = hf.read_hf(tmp_path)
  m = config.model
  assert (m.moe_experts, m.moe_top_k, m.moe_hidden, m.moe_dispatch) == (3, 2, 24, "dropless")
  assert np.abs(jax_logits(config, params) - hf_logits(model)).max() <= 1e-4
  # The stacked (scan_layers) tree imports too: experts stack on axis 1, after the layers.
  config.model.scan_layers = True
  stacked = hf.params_from_hf(load_file(tmp_path / "model.safetensors"), config)
  assert stacked["decoder"]["layers"]["block"]["mlp"]["wi_gate"].shape == (2, 3, 40, 24)
  assert np.abs(jax_logits(config, stacked) - hf_logits(model)).max() <= 1e-4
  config.model.scan_layers = False
  generator = decode.Generator(config.model, params)
  assert generator.generate(PROMPTS, 6) == [hf_greedy(model, prompt, 6) for prompt in PROMPTS]


def test_mixtral_export_loads_in_transformers_and_matches(tmp_path):
  config = tiny_config(**MOE)
  params = model_lib.build(config.model).init(jax.random.key(3), jnp.asarray(TOKENS))["params"]
  leaves, tree = jax.tree.flatten(hf._unbox(params))  # norms start at exactly 1: perturb every weight
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hf.write_hf(params, config, tmp_path)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
  model.eval()
  assert type(model).__name__ == "MixtralForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert np.abs(jax_logits(config, params) - hf_logits(model)).max() <= 1e-4
  # Export then import gives back the same weights.
  config_back, params_back = hf.read_hf(tmp_path)
  for path, value in hf.flatten(hf._unbox(params)).items():
    np.testing.assert_array_equal(hf.flatten(params_back)[path], np.asarray(value, np.float32))
  assert config_back.model.moe_experts == 3


def test_mixtral_differences_are_named(tmp_path):
  hf_mixtral(tmp_path)
  state = load_file(tmp_path / "model.safetensors")
  config = hf.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  broken = dict(state)
  del broken["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
  broken["model.layers.1.block_sparse_moe.experts.3.w3.weight"] = np.zeros((24, 40), np.float32)
  with pytest.raises(
    hf.ConvertError,
    match=r"missing keys \['model.layers.1.block_sparse_moe.experts.2.w3.weight'\].*"
    r"unexpected keys \['model.layers.1.block_sparse_moe.experts.3.w3.weight'\]",
  ):
    hf.params_from_hf(broken, config)
  narrow = dict(state, **{"model.layers.0.block_sparse_moe.experts.1.w1.weight": np.zeros((23, 40), np.float32)})
  with pytest.raises(hf.ConvertError, match="experts of decoder/layer_0/mlp/wi_gate differ in shape"):
    hf.params_from_hf(narrow, config)
  windowed = json.loads((tmp_path / "config.json").read_text()) | {"sliding_window": 16}
  with pytest.raises(hf.ConvertError, match="sliding_window"):
    hf.config_from_hf(windowed)
  one_expert = json.loads((tmp_path / "config.json").read_text()) | {"num_experts_per_tok": 1}
  with pytest.raises(hf.ConvertError, match="num_experts_per_tok=1"):  # HF weighs it 1, jaxlm by its probability
    hf.config_from_hf(one_expert)


@pytest.mark.parametrize(
  "overrides,key",
  [
    (dict(moe_shared_experts=1), "model.moe_shared_experts=1"),  # Mixtral has no shared expert
    (dict(moe_every=2, scan_layers=False), "model.moe_every=2"),  # every Mixtral layer is sparse
    (dict(moe_top_k=1), "model.moe_top_k=1"),  # HF renormalizes over the top k: one expert would weigh 1
    (dict(use_bias=True), "model.use_bias=True"),
  ],
)
def test_mixtral_export_refuses_what_it_cannot_express(overrides, key):
  with pytest.raises(hf.ConvertError, match="^" + re.escape(key) + " cannot be expressed by MixtralForCausalLM"):
    hf.config_to_hf(tiny_config(**(MOE | overrides)).model)
