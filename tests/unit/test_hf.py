"""Hugging Face interop: logits parity both ways with random HF models built offline, and loud key errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file
from support import tiny_config

from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.models import transformer as model_lib

HF_MODELS = {
  "gpt2": lambda: transformers.GPT2LMHeadModel(
    transformers.GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64)
  ),
  "llama_gqa_untied": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=260,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
    )
  ),
  "llama_tied": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=260,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=64,
      tie_word_embeddings=True,
      rms_norm_eps=1e-5,
    )
  ),
  # ALiBi: 6 heads, not a power of two, takes the interleaved slopes (jaxlm.models.layers.alibi_slopes).
  "bloom": lambda: transformers.BloomForCausalLM(
    transformers.BloomConfig(vocab_size=260, hidden_size=48, n_layer=2, n_head=6)
  ),
  "bert": lambda: transformers.BertForMaskedLM(
    transformers.BertConfig(
      vocab_size=260,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=64,
      type_vocab_size=2,
    )
  ),
}
TOKENS = np.random.default_rng(0).integers(4, 260, (2, 24))
# jaxlm's BERT (presets.bert) at the tiny size.
BERT = dict(
  family="encoder", norm_position="post", num_token_types=2, embed_norm=True, mlp="gelu_exact", norm_eps=1e-12
)
# Padding: row 0 has its last 5 tokens padded, row 1 none. Token types: a second "sentence" from position 10.
SEGMENTS = np.ones_like(TOKENS)
SEGMENTS[0, -5:] = 0
TYPES = (np.arange(TOKENS.shape[1]) >= 10).astype(TOKENS.dtype)[None].repeat(2, 0) * SEGMENTS


def save_hf(name, directory):
  torch.manual_seed(0)
  model = HF_MODELS[name]().eval()
  with torch.no_grad():  # HF inits some weights to exact ones/zeros; perturb all so every mapping is exercised
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def hf_logits(model, padded=False):
  with torch.no_grad():
    if not padded:
      return model(torch.tensor(TOKENS)).logits.numpy()
    return model(
      torch.tensor(TOKENS), attention_mask=torch.tensor(SEGMENTS), token_type_ids=torch.tensor(TYPES)
    ).logits.numpy()


def jax_logits(config, params, padded=False):
  apply = jax.jit(model_lib.build(config.model).apply)
  if not padded:
    return np.asarray(apply({"params": params}, jnp.asarray(TOKENS)))
  return np.asarray(
    apply(
      {"params": params}, jnp.asarray(TOKENS), segment_ids_BxT=jnp.asarray(SEGMENTS), token_types_BxT=jnp.asarray(TYPES)
    )
  )


def padded_diff(config, params, model):
  """Max |jaxlm - HF| over the real (unpadded) tokens; HF still computes outputs at pads, jaxlm masks them."""
  diff = np.abs(jax_logits(config, params, padded=True) - hf_logits(model, padded=True))
  return diff[SEGMENTS.astype(bool)].max()


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_import_matches_hf_logits(name, tmp_path):
  model = save_hf(name, tmp_path)
  config, params = hf.read_hf(tmp_path)
  assert np.abs(jax_logits(config, params) - hf_logits(model)).max() <= 1e-4
  # The stacked (scan_layers) tree imports too and computes the same.
  config.model.scan_layers = True
  state = load_file(tmp_path / "model.safetensors")
  stacked = hf.params_from_hf(state, config)
  assert "layers" in stacked["encoder" if name == "bert" else "decoder"]
  assert np.abs(jax_logits(config, stacked) - hf_logits(model)).max() <= 1e-4
  if name == "bert":  # HF attention_mask 0 on trailing pads is jaxlm's segment id 0; token type 1 is used too
    assert padded_diff(config, stacked, model) <= 1e-4


@pytest.mark.parametrize("style", ["gpt2", "llama", "bert", "bloom"])
def test_export_matches_in_transformers(style, tmp_path):
  overrides = {
    "gpt2": {},
    "bert": BERT,
    "bloom": dict(position="alibi", embed_norm=True, mlp_dim=128),
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False, num_kv_heads=2),
  }
  config = tiny_config(**overrides[style])
  params = model_lib.build(config.model).init(jax.random.key(3), jnp.asarray(TOKENS))["params"]
  if style == "bert":  # init leaves biases at 0 and norms at 1; perturb so every mapping is exercised
    leaves, tree = jax.tree.flatten(hf._unbox(params))
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hf.write_hf(params, config, tmp_path)
  auto = transformers.AutoModelForMaskedLM if style == "bert" else transformers.AutoModelForCausalLM
  model, info = auto.from_pretrained(tmp_path, output_loading_info=True)
  model.eval()
  assert type(model).__name__ == hf.config_to_hf(config.model)["architectures"][0]
  if style == "bert":  # nothing left at HF's random init, nothing written that HF drops
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert padded_diff(config, params, model) <= 1e-4
  assert np.abs(jax_logits(config, params) - hf_logits(model)).max() <= 1e-4


def test_mismatches_are_listed_never_silent(tmp_path):
  save_hf("llama_gqa_untied", tmp_path)
  state = load_file(tmp_path / "model.safetensors")
  config = hf.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  broken = dict(state)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(
    hf.ConvertError,
    match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\].*"
    r"unexpected keys \['model.layers.1.mlp.extra.weight'\]",
  ):
    hf.params_from_hf(broken, config)
  bad_shape = dict(state, **{"model.layers.0.mlp.gate_proj.weight": np.zeros((65, 32), np.float32)})
  with pytest.raises(hf.ConvertError, match="gate"):
    hf.params_from_hf(bad_shape, config)
  bad_config = json.loads((tmp_path / "config.json").read_text()) | {"hidden_act": "gelu"}
  with pytest.raises(hf.ConvertError, match="hidden_act"):
    hf.config_from_hf(bad_config)


def test_bert_mismatches_are_listed(tmp_path):
  save_hf("bert", tmp_path)
  state = load_file(tmp_path / "model.safetensors")
  config = hf.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
  assert config.model.family == "encoder" and config.model.mlp == "gelu_exact"
  broken = dict(state)
  del broken["bert.encoder.layer.1.attention.self.key.bias"]
  broken["bert.encoder.layer.1.attention.self.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(
    hf.ConvertError,
    match=r"missing keys \['bert.encoder.layer.1.attention.self.key.bias'\].*"
    r"unexpected keys \['bert.encoder.layer.1.attention.self.extra.weight'\]",
  ):
    hf.params_from_hf(broken, config)
  bad_shape = dict(state, **{"bert.embeddings.token_type_embeddings.weight": np.zeros((3, 32), np.float32)})
  with pytest.raises(hf.ConvertError, match="token_type"):
    hf.params_from_hf(bad_shape, config)
  bad_config = json.loads((tmp_path / "config.json").read_text()) | {"hidden_act": "gelu_new"}
  with pytest.raises(hf.ConvertError, match="hidden_act"):
    hf.config_from_hf(bad_config)
  # A run that is an encoder but not BERT's (pre-norm) is refused on export with the reason.
  with pytest.raises(hf.ConvertError, match="BertForMaskedLM"):
    hf.config_to_hf(tiny_config(**(BERT | {"norm_position": "pre"})).model)


def test_convert_cli_round_trip_and_generate(tmp_path, capsys):
  save_hf("gpt2", tmp_path / "hf")
  run = tmp_path / "run"
  assert main.main(["convert", "--from-hf", str(tmp_path / "hf"), "--workdir", str(run)]) == 0
  assert (run / "config.json").is_file() and (run / "tokenizer.json").is_file()
  loaded = loader.load(run)
  assert loaded.step == 0
  assert main.main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "back")]) == 0
  # The usual file mode (the umask's, as config.json has), not the 0600 safetensors creates files with.
  modes = {name: (tmp_path / "back" / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
  assert modes["model.safetensors"] == modes["config.json"] and modes["config.json"] & 0o044, modes
  before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
  for key in after:
    np.testing.assert_array_equal(before[key], after[key])
  # The byte tokenizer's special ids travel with the export, so HF `generate` stops at jaxlm's EOS.
  back = json.loads((tmp_path / "back" / "config.json").read_text())
  assert (back["bos_token_id"], back["eos_token_id"], back["pad_token_id"]) == (1, 2, 0)
  assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == 2
  # A run directory that already holds checkpoints is refused (exit 2, one line).
  assert main.main(["convert", "--from-hf", str(tmp_path / "hf"), "--workdir", str(run)]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err
  assert main.main(["convert", "--from-hf", str(tmp_path / "nope"), "--workdir", str(tmp_path / "r2")]) == 2
  assert "config.json" in capsys.readouterr().err


def test_convert_cli_round_trip_bert(tmp_path):
  save_hf("bert", tmp_path / "hf")
  run = tmp_path / "run"
  assert main.main(["convert", "--from-hf", str(tmp_path / "hf"), "--workdir", str(run)]) == 0
  assert loader.load(run).config.model.family == "encoder"
  assert main.main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "back")]) == 0
  before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
  assert sorted(before) == sorted(after)
  for key in after:
    np.testing.assert_array_equal(before[key], after[key])


GPTJ = dict(parallel_residual=True, position="rope", use_bias=False, tie_embeddings=False)


def test_parallel_residual_exports_to_gptj(tmp_path):
  """jaxlm's parallel block with RoPE and no biases is GPT-J: logits equal in transformers (random init, offline)."""
  config = tiny_config(**GPTJ)
  params = model_lib.build(config.model).init(jax.random.key(5), jnp.asarray(TOKENS))["params"]
  leaves, tree = jax.tree.flatten(hf._unbox(params))  # norms start at exactly 1: perturb every weight
  keys = jax.random.split(jax.random.key(6), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hf.write_hf(params, config, tmp_path)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
  model.eval()
  assert type(model).__name__ == "GPTJForCausalLM"
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert np.abs(jax_logits(config, params) - hf_logits(model)).max() <= 1e-4
  with pytest.raises(hf.ConvertError, match="export only"):
    hf.params_from_hf(load_file(tmp_path / "model.safetensors"), config)


@pytest.mark.parametrize(
  "overrides,key",
  [
    (dict(mlp="squared_relu"), "model.mlp='squared_relu'"),
    (dict(parallel_residual=True), "model.parallel_residual=True"),
    (GPTJ | dict(use_bias=True), "model.use_bias=True"),  # GPT-J has no attention biases
    (GPTJ | dict(rope_theta=500000.0), "model.rope_theta=500000.0"),  # GPT-J's RoPE base is fixed
    (dict(scale_embeddings=True), "model.scale_embeddings=True"),
    (dict(embed_norm=True), "model.embed_norm=True"),
    (dict(position="alibi", embed_norm=True), "model.mlp_dim=64"),  # BLOOM's MLP is 4 * d_model
    (dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_token_types=2), "model.num_token_types=2"),
    (dict(family="encoder_decoder"), "model.family='encoder_decoder'"),
  ],
)
def test_export_refuses_every_option_hf_cannot_express(overrides, key):
  """Each non-default option the closest architecture lacks is named, in one line, before anything is written."""
  with pytest.raises(hf.ConvertError, match="^" + re.escape(key) + " cannot be expressed by "):
    hf.config_to_hf(tiny_config(**overrides).model)


def test_a_new_model_key_is_refused_unless_default(monkeypatch):
  """A key the export tables do not know passes at its base default and is refused otherwise."""
  base = hf.config_lib.base_config

  def with_new_key():
    c = base()
    c.model.new_option = False
    return c

  monkeypatch.setattr(hf.config_lib, "base_config", with_new_key)
  m = with_new_key().model
  assert hf.architecture_of(m) == "GPT2LMHeadModel"
  m.new_option = True
  with pytest.raises(hf.ConvertError, match="^model.new_option=True cannot be expressed by GPT2LMHeadModel"):
    hf.architecture_of(m)
