"""Hugging Face interop: GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM and BertForMaskedLM as config.json +
model.safetensors both ways, and GPTJForCausalLM (jaxlm's parallel residual) for export.

Weights are read and written with `safetensors.numpy`, so conversion needs
no torch. Layout facts the mapping relies on:
  GPT-2: Conv1D weights stored (in, out); c_attn is (D, 3D) = [q | k | v];
         lm_head is tied to wte and not saved; gelu_new; LayerNorm.
  Llama: Linear weights stored (out, in), no biases; k/v are (K*H, D); MLP is
         down(silu(gate) * up); RMSNorm weight only; half-split RoPE (ours).
  BERT:  Linear weights stored (out, in) with biases; post-LayerNorm; exact
         (erf) GELU; embedding LayerNorm over word + position + token type;
         MLM head dense + GELU + LayerNorm, decoder tied to the word
         embeddings (save_pretrained writes only cls.predictions.bias).
         Our Encoder's segment id 0 is HF's attention_mask 0.
  Mixtral: Llama's attention and norms; each MLP is block_sparse_moe: `gate` (E, D) router, softmax over
         all E in float32, top-k, weights renormalized over the k; experts.e.w1 (gate), w3 (up), w2 (down)
         Linear (out, in), our E x D x F / E x F x D stacks (jaxlm/models/moe.py) one slice per expert.
  BLOOM: Linear weights stored (out, in) with biases; query_key_value is (N*3*H, D), each head's q, k, v side
         by side; LayerNorm over the word embeddings (embed_norm); ALiBi (model.position='alibi'), no position
         table; MLP 4*D with tanh GELU; lm_head tied to the word embeddings.
  GPT-J: Linear weights stored (out, in); one ln_1 feeds attention and MLP
         (parallel residual); no attention biases; interleaved RoPE over
         rotary_dim = head_dim; untied lm_head with a bias.
Every conversion checks the full key set and every shape against the model
jaxlm would build, and fails with the list of differences: a missing or
renamed key never leaves a weight at its random init. A tokenizer.json beside
the weights travels both ways (jaxlm/data/hf_tokenizer.py); without one a converted
run gets jaxlm's byte tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from einops import EinopsError, rearrange

from jaxlm import config as config_lib
from jaxlm.errors import JaxlmError
from jaxlm.inference.export import flatten, unflatten
from jaxlm.models import moe as moe_lib
from jaxlm.models import transformer as model_lib
from jaxlm.storage import fs


class ConvertError(JaxlmError, ValueError):
  """An unsupported or inconsistent checkpoint; the message lists what differs."""


ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM", "BertForMaskedLM", "BloomForCausalLM")


# --- configs ----------------------------------------------------------------------------------------


def _require(hf: dict, key: str, allowed, default=None):
  value = hf.get(key, default)
  if value not in allowed:
    raise ConvertError(f"config.json: {key}={value!r} is not supported; jaxlm maps only {list(allowed)}")
  return value


def config_from_hf(hf: dict) -> config_lib.ConfigDict:
  """A full jaxlm config (base defaults + the HF model's shape) for a HF config.json dict."""
  arch = (hf.get("architectures") or [""])[0]
  c = config_lib.base_config()
  m = c.model
  if arch == "GPT2LMHeadModel":
    _require(hf, "activation_function", ("gelu_new",), "gelu_new")
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    _require(hf, "tie_word_embeddings", (True,), True)
    m.vocab_size, m.max_len, m.d_model = hf["vocab_size"], hf["n_positions"], hf["n_embd"]
    m.num_layers, m.num_heads = hf["n_layer"], hf["n_head"]
    m.mlp_dim = hf.get("n_inner") or 4 * hf["n_embd"]
    m.norm_eps = hf.get("layer_norm_epsilon", 1e-5)
    m.norm, m.position, m.mlp, m.use_bias, m.tie_embeddings = "layernorm", "learned", "gelu", True, True
  elif arch in ("LlamaForCausalLM", "MixtralForCausalLM"):
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "attention_bias", (False,), False)
    _require(hf, "mlp_bias", (False,), False)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _require(rope, "rope_type", ("default",), "default")
    m.vocab_size, m.max_len, m.d_model = hf["vocab_size"], hf["max_position_embeddings"], hf["hidden_size"]
    m.num_layers, m.num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    m.num_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    m.head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    m.mlp_dim, m.norm_eps = hf["intermediate_size"], hf.get("rms_norm_eps", 1e-6)
    m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.norm, m.position, m.mlp, m.use_bias = "rmsnorm", "rope", "swiglu", False
    if arch == "MixtralForCausalLM":
      _require(hf, "sliding_window", (None,), None)  # jaxlm attends to the whole context
      m.moe_experts, m.moe_top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
      if not 2 <= m.moe_top_k <= m.moe_experts:
        raise ConvertError(
          f"config.json: num_experts_per_tok={m.moe_top_k} is not supported; jaxlm maps 2 to num_local_experts "
          "(with one expert jaxlm weights it by its probability, as Switch; HF Mixtral by 1)"
        )
      m.moe_hidden = hf["intermediate_size"]
      m.moe_dispatch = "dropless"  # HF drops no token: neither may the imported model
      # HF's load-balancing loss is top-k times jaxlm's (jaxlm/models/moe.py): the same objective.
      m.moe_aux_loss_weight = hf.get("router_aux_loss_coef", 0.001) * m.moe_top_k
  elif arch == "BertForMaskedLM":
    _require(hf, "hidden_act", ("gelu",), "gelu")
    _require(hf, "position_embedding_type", ("absolute",), "absolute")
    _require(hf, "is_decoder", (False,), False)
    _require(hf, "add_cross_attention", (False,), False)
    _require(hf, "tie_word_embeddings", (True,), True)
    if hf["hidden_size"] % hf["num_attention_heads"]:
      raise ConvertError(
        f"config.json: hidden_size={hf['hidden_size']} is not a multiple of "
        f"num_attention_heads={hf['num_attention_heads']}"
      )
    m.family, m.norm_position, m.embed_norm = "encoder", "post", True
    m.vocab_size, m.max_len, m.d_model = hf["vocab_size"], hf["max_position_embeddings"], hf["hidden_size"]
    m.num_layers, m.num_heads, m.mlp_dim = hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"]
    m.num_token_types = hf.get("type_vocab_size", 2)
    m.norm_eps = hf.get("layer_norm_eps", 1e-12)
    m.norm, m.position, m.mlp, m.use_bias, m.tie_embeddings = "layernorm", "learned", "gelu_exact", True, True
  elif arch == "BloomForCausalLM":
    _require(hf, "apply_residual_connection_post_layernorm", (False,), False)
    _require(hf, "tie_word_embeddings", (True,), True)
    m.vocab_size, m.d_model = hf["vocab_size"], hf.get("hidden_size") or hf["n_embed"]
    m.num_layers, m.num_heads = hf["n_layer"], hf["n_head"]
    m.mlp_dim, m.norm_eps = 4 * m.d_model, hf.get("layer_norm_epsilon", 1e-5)
    m.max_len = hf.get("seq_length", 2048)  # ALiBi has no position table: BLOOM's training length
    m.norm, m.position, m.mlp, m.use_bias, m.embed_norm = "layernorm", "alibi", "gelu", True, True
  else:
    raise ConvertError(f"config.json: architecture {arch!r} is not supported; convert one of {list(ARCHITECTURES)}")
  c.data.seq_len = min(c.data.seq_len, m.max_len)
  return c


def _heads_cover_d_model(m) -> bool:
  return config_lib.head_dim(m) * m.num_heads == m.d_model


def _multi_head(m) -> bool:
  return config_lib.num_kv_heads(m) == m.num_heads


# Per export architecture, what each model key must be for HF to compute what jaxlm computes: a value, a
# tuple of values, or a predicate of the whole model config. Keys in _FREE change no computation HF sees
# (sizes the converter maps, how the weights are stored, numerics settings, kernels, introspection: the schema's
# `WEIGHTS_FREE` marks). Any other key must keep its base_config() default, so an option added later is refused
# until its architecture says otherwise.
_FREE = config_lib.model_keys("size", "storage", "runtime")
_EXPORTS = {
  "GPT2LMHeadModel": dict(
    family="decoder",
    norm="layernorm",
    norm_position="pre",
    position="learned",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
    num_kv_heads=_multi_head,
    head_dim=_heads_cover_d_model,
    rope_theta=None,
  ),
  "LlamaForCausalLM": dict(
    family="decoder",
    norm="rmsnorm",
    norm_position="pre",
    position="rope",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=None,
    num_kv_heads=None,
    head_dim=None,
    rope_theta=None,
  ),
  # Llama with a sparse MLP in every layer. The router's loss weights only train; the dispatch decides which
  # tokens an over-full expert skips, so a capacity-trained run exports too (HF computes it dropless, as jaxlm
  # does with moe_dispatch 'dropless' or 'dense').
  "MixtralForCausalLM": dict(
    family="decoder",
    norm="rmsnorm",
    norm_position="pre",
    position="rope",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=None,
    num_kv_heads=None,
    head_dim=None,
    rope_theta=None,
    moe_experts=lambda m: m.moe_experts > 0,
    moe_top_k=lambda m: m.moe_top_k >= 2,  # HF renormalizes the top k: one expert would weigh 1, ours p
    moe_hidden=None,
    moe_shared_experts=(0,),  # Mixtral has no shared expert
    moe_every=(1,),
    moe_dispatch=None,
    moe_capacity_factor=None,
    moe_aux_loss_weight=None,
    moe_z_loss_weight=None,
  ),
  # GPT-J: one LayerNorm shared by attention and MLP (parallel residual), interleaved RoPE on the whole head
  # (the exporter permutes q/k to it), no attention biases; its LayerNorm, MLP and lm_head biases are written
  # as zeros, so jaxlm's use_bias=False is exactly it.
  "GPTJForCausalLM": dict(
    family="decoder",
    norm="layernorm",
    norm_position="pre",
    position="rope",
    mlp="gelu",
    use_bias=False,
    tie_embeddings=False,
    num_kv_heads=_multi_head,
    head_dim=_heads_cover_d_model,
    rope_theta=(10000.0,),
    parallel_residual=True,
  ),
  "BloomForCausalLM": dict(
    family="decoder",
    norm="layernorm",
    norm_position="pre",
    position="alibi",
    mlp="gelu",
    mlp_dim=lambda m: m.mlp_dim == 4 * m.d_model,  # BLOOM's MLP is always 4 * hidden_size
    use_bias=True,
    tie_embeddings=True,
    num_kv_heads=_multi_head,
    head_dim=_heads_cover_d_model,
    rope_theta=None,
    embed_norm=True,
  ),
  "BertForMaskedLM": dict(
    family="encoder",
    norm="layernorm",
    norm_position="post",
    position="learned",
    mlp="gelu_exact",
    use_bias=True,
    tie_embeddings=True,
    num_kv_heads=_multi_head,
    head_dim=_heads_cover_d_model,
    rope_theta=None,
    embed_norm=True,
    num_token_types=lambda m: m.num_token_types >= 1,
  ),  # HF BERT always has token types
}


def _mismatches(m, spec: dict) -> list[str]:
  """The model keys whose values `spec` (one of _EXPORTS) cannot express, as 'model.KEY=VALUE'."""
  defaults = config_lib.base_config().model
  bad = []
  for key in sorted(m.keys()):
    if key in _FREE and key not in spec:  # a free key the architecture constrains is checked too
      continue
    wanted, value = spec.get(key, (defaults.get(key),)), m[key]
    if wanted is None:
      continue  # any value maps
    ok = wanted(m) if callable(wanted) else value in (wanted if isinstance(wanted, tuple) else (wanted,))
    if not ok:
      bad.append(f"model.{key}={value!r}")
  return bad


def architecture_of(m) -> str:
  """The HF architecture whose computation equals the model sub-config `m`'s, or ConvertError naming the first
  key the closest architecture cannot express."""
  misses = {arch: _mismatches(m, spec) for arch, spec in _EXPORTS.items()}
  for arch, bad in misses.items():
    if not bad:
      return arch
  closest = min(misses, key=lambda arch: (m.family != _EXPORTS[arch]["family"], len(misses[arch])))
  raise ConvertError(
    f"{misses[closest][0]} cannot be expressed by {closest}, the closest Hugging Face "
    f"architecture jaxlm exports ({', '.join(_EXPORTS)}); this run cannot be exported to HF"
  )


def config_to_hf(m) -> dict:
  """The Hugging Face config.json dict for the model sub-config `m`; raises ConvertError if no architecture fits."""
  arch = architecture_of(m)
  if arch == "GPT2LMHeadModel":
    return {
      "architectures": [arch],
      "model_type": "gpt2",
      "vocab_size": m.vocab_size,
      "n_positions": m.max_len,
      "n_embd": m.d_model,
      "n_layer": m.num_layers,
      "n_head": m.num_heads,
      "n_inner": m.mlp_dim,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": m.norm_eps,
      "tie_word_embeddings": True,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "torch_dtype": "float32",
    }
  if arch == "GPTJForCausalLM":
    return {
      "architectures": [arch],
      "model_type": "gptj",
      "vocab_size": m.vocab_size,
      "n_positions": m.max_len,
      "n_embd": m.d_model,
      "n_layer": m.num_layers,
      "n_head": m.num_heads,
      "n_inner": m.mlp_dim,
      "rotary_dim": config_lib.head_dim(m),
      "activation_function": "gelu_new",
      "layer_norm_epsilon": m.norm_eps,
      "tie_word_embeddings": False,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "torch_dtype": "float32",
    }
  if arch == "BloomForCausalLM":
    return {
      "architectures": [arch],
      "model_type": "bloom",
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "n_layer": m.num_layers,
      "n_head": m.num_heads,
      "layer_norm_epsilon": m.norm_eps,
      "apply_residual_connection_post_layernorm": False,
      "tie_word_embeddings": True,
      "hidden_dropout": 0.0,
      "attention_dropout": 0.0,
      "seq_length": m.max_len,
      "torch_dtype": "float32",
    }
  if arch == "BertForMaskedLM":
    return {
      "architectures": [arch],
      "model_type": "bert",
      "vocab_size": m.vocab_size,
      "max_position_embeddings": m.max_len,
      "hidden_size": m.d_model,
      "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "type_vocab_size": m.num_token_types,
      "hidden_act": "gelu",
      "layer_norm_eps": m.norm_eps,
      "position_embedding_type": "absolute",
      "tie_word_embeddings": True,
      "is_decoder": False,
      "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0,
      "pad_token_id": 0,
      "torch_dtype": "float32",
    }
  llama = {
    "architectures": [arch],
    "model_type": "llama",
    "vocab_size": m.vocab_size,
    "max_position_embeddings": m.max_len,
    "hidden_size": m.d_model,
    "intermediate_size": m.mlp_dim,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": config_lib.num_kv_heads(m),
    "head_dim": config_lib.head_dim(m),
    "hidden_act": "silu",
    "rms_norm_eps": m.norm_eps,
    "rope_theta": m.rope_theta,
    "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
    "tie_word_embeddings": bool(m.tie_embeddings),
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
  }
  if arch == "LlamaForCausalLM":
    return llama
  for key in ("attention_bias", "mlp_bias"):  # Mixtral has neither
    del llama[key]
  return llama | {
    "model_type": "mixtral",
    "intermediate_size": moe_lib.hidden_size(m),
    "num_local_experts": m.moe_experts,
    "num_experts_per_tok": m.moe_top_k,
    "router_aux_loss_coef": m.moe_aux_loss_weight / m.moe_top_k,  # HF's loss is top-k times ours
    "router_jitter_noise": 0.0,
    "sliding_window": None,
  }


# --- weights: one table per architecture of (hf key, jaxlm path, to jaxlm, to hf) -------------------


# HF keeps the heads of a projection side by side; ours keep them apart (q/k/v kernels D x heads x H, the output
# kernel N x H x D, q/k/v biases heads x H). Each pair below is (to jaxlm, to hf) for a head dimension h.
def _linear_heads(h):
  """A Linear (out, in) = ((heads H), D) weight <-> our D x heads x H kernel."""
  return (lambda w: rearrange(w, "(N H) D -> D N H", H=h), lambda k: rearrange(k, "D N H -> (N H) D"))


def _linear_out(h):
  """A Linear (out, in) = (D, (N H)) output weight <-> our N x H x D kernel."""
  return (lambda w: rearrange(w, "D (N H) -> N H D", H=h), lambda k: rearrange(k, "N H D -> D (N H)"))


def _bias_heads(h):
  return (lambda b: rearrange(b, "(N H) -> N H", H=h), lambda b: rearrange(b, "N H -> (N H)"))


def _gpt2_table(m):
  h, d = config_lib.head_dim(m), m.d_model
  rows = [
    ("transformer.wte.weight", "embedder/token/embedding"),
    ("transformer.wpe.weight", "embedder/position/embedding"),
    ("transformer.ln_f.weight", "final_norm/scale"),
    ("transformer.ln_f.bias", "final_norm/bias"),
  ]
  rows = [(k, p, None, None) for k, p in rows]
  for i in range(m.num_layers):
    hf, ours = f"transformer.h.{i}.", f"decoder/layer_{i}/"
    for hf_norm, our_norm in (("ln_1", "self_attention_norm"), ("ln_2", "mlp_norm")):
      rows += [
        (f"{hf}{hf_norm}.weight", f"{ours}{our_norm}/scale", None, None),
        (f"{hf}{hf_norm}.bias", f"{ours}{our_norm}/bias", None, None),
      ]
    for j, name in enumerate(("query", "key", "value")):
      # One HF tensor feeds three of ours: the importer slices it, the exporter concatenates.
      # Conv1D stores (in, out): the heads sit on the second axis of c_attn and the first of c_proj.
      rows.append(
        (
          f"{hf}attn.c_attn.weight#{j}",
          f"{ours}self_attention/{name}/kernel",
          lambda w, j=j: rearrange(w[:, j * d : (j + 1) * d], "D (N H) -> D N H", H=h),
          lambda k: rearrange(k, "D N H -> D (N H)"),
        )
      )
      rows.append(
        (
          f"{hf}attn.c_attn.bias#{j}",
          f"{ours}self_attention/{name}/bias",
          lambda b, j=j: _bias_heads(h)[0](b[j * d : (j + 1) * d]),
          _bias_heads(h)[1],
        )
      )
    rows += [
      (
        f"{hf}attn.c_proj.weight",
        f"{ours}self_attention/out/kernel",
        lambda w: rearrange(w, "(N H) D -> N H D", H=h),
        lambda k: rearrange(k, "N H D -> (N H) D"),
      ),
      (f"{hf}attn.c_proj.bias", f"{ours}self_attention/out/bias", None, None),
      (f"{hf}mlp.c_fc.weight", f"{ours}mlp/up/kernel", None, None),
      (f"{hf}mlp.c_fc.bias", f"{ours}mlp/up/bias", None, None),
      (f"{hf}mlp.c_proj.weight", f"{ours}mlp/down/kernel", None, None),
      (f"{hf}mlp.c_proj.bias", f"{ours}mlp/down/bias", None, None),
    ]
  return rows


def _llama_table(m):
  into, out_of = _linear_heads(config_lib.head_dim(m)), _linear_out(config_lib.head_dim(m))
  rows = [
    ("model.embed_tokens.weight", "embedder/token/embedding", None, None),
    ("model.norm.weight", "final_norm/scale", None, None),
  ]
  if not m.tie_embeddings:
    rows.append(("lm_head.weight", "embedder/unembed/kernel", lambda w: w.T, lambda x: x.T))
  for i in range(m.num_layers):
    hf, ours = f"model.layers.{i}.", f"decoder/layer_{i}/"
    rows += [
      (f"{hf}input_layernorm.weight", f"{ours}self_attention_norm/scale", None, None),
      (f"{hf}post_attention_layernorm.weight", f"{ours}mlp_norm/scale", None, None),
      (f"{hf}self_attn.q_proj.weight", f"{ours}self_attention/query/kernel", *into),
      (f"{hf}self_attn.k_proj.weight", f"{ours}self_attention/key/kernel", *into),
      (f"{hf}self_attn.v_proj.weight", f"{ours}self_attention/value/kernel", *into),
      (f"{hf}self_attn.o_proj.weight", f"{ours}self_attention/out/kernel", *out_of),
    ]
    if m.get("moe_experts", 0):  # Mixtral
      rows += _mixtral_moe_rows(m, f"{hf}block_sparse_moe.", f"{ours}mlp/")
      continue
    rows += [
      (f"{hf}mlp.gate_proj.weight", f"{ours}mlp/gate/kernel", lambda w: w.T, lambda x: x.T),
      (f"{hf}mlp.up_proj.weight", f"{ours}mlp/up/kernel", lambda w: w.T, lambda x: x.T),
      (f"{hf}mlp.down_proj.weight", f"{ours}mlp/down/kernel", lambda w: w.T, lambda x: x.T),
    ]
  return rows


def _mixtral_moe_rows(m, hf: str, ours: str):
  """One layer's sparse MLP: HF's per-expert Linear weights, (out, in), are slices of our expert stacks. A jaxlm
  path ending in '#e' is expert e of the stack (axis 0): the importer stacks the experts, the exporter slices."""
  t = (lambda w: w.T, lambda x: x.T)
  rows = [(f"{hf}gate.weight", f"{ours}router/kernel", *t)]
  for e in range(m.moe_experts):
    rows += [
      (f"{hf}experts.{e}.w1.weight", f"{ours}wi_gate#{e}", *t),
      (f"{hf}experts.{e}.w3.weight", f"{ours}wi_up#{e}", *t),
      (f"{hf}experts.{e}.w2.weight", f"{ours}wo#{e}", *t),
    ]
  return rows


def _bert_table(m):
  h = config_lib.head_dim(m)
  t = (lambda w: w.T, lambda x: x.T)
  into, heads, out_of = _linear_heads(h), _bias_heads(h), _linear_out(h)
  rows = [
    ("bert.embeddings.word_embeddings.weight", "embedder/token/embedding", None, None),
    ("bert.embeddings.position_embeddings.weight", "embedder/position/embedding", None, None),
    ("bert.embeddings.token_type_embeddings.weight", "embedder/token_type/embedding", None, None),
    ("bert.embeddings.LayerNorm.weight", "embedder/embed_norm/scale", None, None),
    ("bert.embeddings.LayerNorm.bias", "embedder/embed_norm/bias", None, None),
    ("cls.predictions.transform.dense.weight", "mlm_head/transform/kernel", *t),
    ("cls.predictions.transform.dense.bias", "mlm_head/transform/bias", None, None),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_head/transform_norm/scale", None, None),
    ("cls.predictions.transform.LayerNorm.bias", "mlm_head/transform_norm/bias", None, None),
    ("cls.predictions.bias", "mlm_head/bias", None, None),
  ]
  for i in range(m.num_layers):
    hf, ours = f"bert.encoder.layer.{i}.", f"encoder/layer_{i}/"
    for name in ("query", "key", "value"):
      rows += [
        (f"{hf}attention.self.{name}.weight", f"{ours}self_attention/{name}/kernel", *into),
        (f"{hf}attention.self.{name}.bias", f"{ours}self_attention/{name}/bias", *heads),
      ]
    rows += [
      (f"{hf}attention.output.dense.weight", f"{ours}self_attention/out/kernel", *out_of),
      (f"{hf}attention.output.dense.bias", f"{ours}self_attention/out/bias", None, None),
      (f"{hf}attention.output.LayerNorm.weight", f"{ours}self_attention_norm/scale", None, None),
      (f"{hf}attention.output.LayerNorm.bias", f"{ours}self_attention_norm/bias", None, None),
      (f"{hf}intermediate.dense.weight", f"{ours}mlp/up/kernel", *t),
      (f"{hf}intermediate.dense.bias", f"{ours}mlp/up/bias", None, None),
      (f"{hf}output.dense.weight", f"{ours}mlp/down/kernel", *t),
      (f"{hf}output.dense.bias", f"{ours}mlp/down/bias", None, None),
      (f"{hf}output.LayerNorm.weight", f"{ours}mlp_norm/scale", None, None),
      (f"{hf}output.LayerNorm.bias", f"{ours}mlp_norm/bias", None, None),
    ]
  return rows


def _gptj_table(m):
  """Export only. Rows with no jaxlm path are biases jaxlm's use_bias=False leaves out: written as zeros."""
  h, d, f, v = config_lib.head_dim(m), m.d_model, m.mlp_dim, m.vocab_size
  zeros = lambda *shape: lambda _: np.zeros(shape, np.float32)
  # Our RoPE rotates feature pairs (i, i + H/2), GPT-J's pairs (2i, 2i + 1) at the same frequency: interleaving
  # the halves of every q and k head maps one onto the other (q.k is unchanged, as both move alike).
  roped = lambda k: rearrange(k, "D N (two half) -> (N half two) D", two=2)
  rows = [
    ("transformer.wte.weight", "embedder/token/embedding", None, None),
    ("transformer.ln_f.weight", "final_norm/scale", None, None),
    ("transformer.ln_f.bias", None, None, zeros(d)),
    ("lm_head.weight", "embedder/unembed/kernel", None, lambda k: k.T),
    ("lm_head.bias", None, None, zeros(v)),
  ]
  for i in range(m.num_layers):
    hf, ours = f"transformer.h.{i}.", f"decoder/layer_{i}/"
    rows += [
      (f"{hf}ln_1.weight", f"{ours}norm/scale", None, None),
      (f"{hf}ln_1.bias", None, None, zeros(d)),
      (f"{hf}attn.q_proj.weight", f"{ours}self_attention/query/kernel", None, roped),
      (f"{hf}attn.k_proj.weight", f"{ours}self_attention/key/kernel", None, roped),
      (f"{hf}attn.v_proj.weight", f"{ours}self_attention/value/kernel", None, _linear_heads(h)[1]),
      (f"{hf}attn.out_proj.weight", f"{ours}self_attention/out/kernel", None, _linear_out(h)[1]),
      (f"{hf}mlp.fc_in.weight", f"{ours}mlp/up/kernel", None, lambda k: k.T),
      (f"{hf}mlp.fc_in.bias", None, None, zeros(f)),
      (f"{hf}mlp.fc_out.weight", f"{ours}mlp/down/kernel", None, lambda k: k.T),
      (f"{hf}mlp.fc_out.bias", None, None, zeros(d)),
    ]
  return rows


def _bloom_table(m):
  h = config_lib.head_dim(m)
  t = (lambda w: w.T, lambda x: x.T)
  rows = [
    ("transformer.word_embeddings.weight", "embedder/token/embedding", None, None),
    ("transformer.word_embeddings_layernorm.weight", "embedder/embed_norm/scale", None, None),
    ("transformer.word_embeddings_layernorm.bias", "embedder/embed_norm/bias", None, None),
    ("transformer.ln_f.weight", "final_norm/scale", None, None),
    ("transformer.ln_f.bias", "final_norm/bias", None, None),
  ]
  for i in range(m.num_layers):
    hf, ours = f"transformer.h.{i}.", f"decoder/layer_{i}/"
    for j, name in enumerate(("query", "key", "value")):
      # One HF tensor feeds three of ours, each head's q, k, v side by side (params_to_hf interleaves them back).
      rows += [
        (
          f"{hf}self_attention.query_key_value.weight#{j}",
          f"{ours}self_attention/{name}/kernel",
          lambda w, j=j: rearrange(w, "(N three H) D -> three D N H", three=3, H=h)[j],
          lambda k: rearrange(k, "D N H -> N H D"),
        ),
        (
          f"{hf}self_attention.query_key_value.bias#{j}",
          f"{ours}self_attention/{name}/bias",
          lambda b, j=j: rearrange(b, "(N three H) -> three N H", three=3, H=h)[j],
          None,
        ),
      ]
    rows += [
      (f"{hf}input_layernorm.weight", f"{ours}self_attention_norm/scale", None, None),
      (f"{hf}input_layernorm.bias", f"{ours}self_attention_norm/bias", None, None),
      (f"{hf}self_attention.dense.weight", f"{ours}self_attention/out/kernel", *_linear_out(h)),
      (f"{hf}self_attention.dense.bias", f"{ours}self_attention/out/bias", None, None),
      (f"{hf}post_attention_layernorm.weight", f"{ours}mlp_norm/scale", None, None),
      (f"{hf}post_attention_layernorm.bias", f"{ours}mlp_norm/bias", None, None),
      (f"{hf}mlp.dense_h_to_4h.weight", f"{ours}mlp/up/kernel", *t),
      (f"{hf}mlp.dense_h_to_4h.bias", f"{ours}mlp/up/bias", None, None),
      (f"{hf}mlp.dense_4h_to_h.weight", f"{ours}mlp/down/kernel", *t),
      (f"{hf}mlp.dense_4h_to_h.bias", f"{ours}mlp/down/bias", None, None),
    ]
  return rows


def _table(m):
  return {
    "GPT2LMHeadModel": _gpt2_table,
    "LlamaForCausalLM": _llama_table,
    "MixtralForCausalLM": _llama_table,
    "GPTJForCausalLM": _gptj_table,
    "BertForMaskedLM": _bert_table,
    "BloomForCausalLM": _bloom_table,
  }[architecture_of(m)](m)


# Keys HF may save that carry no weights of their own: tied heads and GPT-2's causal-mask buffers.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# BERT: the tied MLM decoder (older save_pretrained wrote it: a copy of the word embeddings and of
# cls.predictions.bias), the position_ids buffer, and the pooler / next-sentence head of BertForPreTraining
# checkpoints (bert-base-uncased), which BertForMaskedLM itself drops on load since MLM never uses them.
_BERT_IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.embeddings.position_ids")
_BERT_IGNORED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.")


def _ignored(key: str, arch: str, m) -> bool:
  if arch == "BertForMaskedLM":
    return key in _BERT_IGNORED or key.startswith(_BERT_IGNORED_PREFIXES)
  return key.endswith(_IGNORED_SUFFIXES) or (key == "lm_head.weight" and m.tie_embeddings)


def _stack_name(m) -> str:
  """The parameter subtree of the layers: BERT's encoder, else the decoder."""
  return "encoder" if architecture_of(m) == "BertForMaskedLM" else "decoder"


def _stack_layers(flat: dict, num_layers: int, stack: str = "decoder") -> dict:
  """The scan_layers tree: {stack}/layer_i/x for every i -> {stack}/layers/block/x stacked on axis 0."""
  out = {p: v for p, v in flat.items() if not p.startswith(f"{stack}/layer_")}
  for path in [p for p in flat if p.startswith(f"{stack}/layer_0/")]:
    rest = path[len(f"{stack}/layer_0/") :]
    out[f"{stack}/layers/block/{rest}"] = np.stack([flat[f"{stack}/layer_{i}/{rest}"] for i in range(num_layers)])
  return out


def _unstack_layers(flat: dict, num_layers: int, stack: str = "decoder") -> dict:
  prefix = f"{stack}/layers/block/"
  out = {p: v for p, v in flat.items() if not p.startswith(prefix)}
  for path, value in flat.items():
    if path.startswith(prefix):
      for i in range(num_layers):
        out[f"{stack}/layer_{i}/{path[len(prefix) :]}"] = value[i]
  return out


def _unbox(params):
  """Plain arrays from params that may still carry Flax's logical-partitioning boxes (fresh `init` output)."""
  import flax.linen as nn  # local: only unboxing needs Flax

  return nn.meta.unbox(params)


def expected_params(config) -> dict:
  """Flat path -> ShapeDtypeStruct of the params jaxlm builds for `config`."""
  batch = model_lib.example_batch(config.model, (1, 8))
  module = model_lib.build(config.model)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **model_lib.model_inputs(config.model, batch)))
  return flatten(_unbox(shapes["params"]))


def _check(found: dict, expected: dict, what: str) -> None:
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  shapes = [
    f"{p}: {tuple(found[p].shape)} vs expected {tuple(expected[p].shape)}"
    for p in sorted(set(found) & set(expected))
    if tuple(found[p].shape) != tuple(expected[p].shape)
  ]
  if missing or unexpected or shapes:
    raise ConvertError(
      f"{what} does not match the model: missing {missing or 'none'}; "
      f"unexpected {unexpected or 'none'}; shape mismatches {shapes or 'none'}"
    )


def params_from_hf(state: dict[str, np.ndarray], config) -> dict:
  """jaxlm params (nested dicts of float32 numpy) from a HF state dict; raises listing any difference."""
  m = config.model
  arch = architecture_of(m)
  if arch not in ARCHITECTURES:
    raise ConvertError(f"importing {arch} is not supported (export only); convert one of {list(ARCHITECTURES)}")
  table = _table(m)
  hf_keys = {k.split("#")[0] for k, *_ in table}
  absent = sorted(k for k in hf_keys if k not in state)
  extra = sorted(k for k in state if k not in hf_keys and not _ignored(k, arch, m))
  if absent or extra:
    raise ConvertError(
      f"model.safetensors does not match {arch}: missing keys {absent or 'none'}; unexpected keys {extra or 'none'}"
    )
  flat, experts = {}, {}
  for hf_key, path, to_ours, _ in table:
    tensor = np.asarray(state[hf_key.split("#")[0]], np.float32)
    try:
      value = to_ours(tensor) if to_ours else tensor
    except (ValueError, EinopsError) as e:
      raise ConvertError(
        f"model.safetensors: {hf_key.split('#')[0]} has shape {tensor.shape}, which does not "
        f"fit {path} ({' '.join(str(e).split())})"
      ) from None
    path, _, expert = path.partition("#")
    if expert:
      experts.setdefault(path, {})[int(expert)] = value
    else:
      flat[path] = value
  for path, parts in experts.items():
    shapes = {tuple(part.shape) for part in parts.values()}
    if len(shapes) > 1:
      raise ConvertError(f"model.safetensors: the experts of {path} differ in shape: {sorted(shapes)}")
    flat[path] = np.stack([parts[e] for e in sorted(parts)])
  if m.scan_layers:
    flat = _stack_layers(flat, m.num_layers, _stack_name(m))
  _check(flat, expected_params(config), "model.safetensors")
  return unflatten(flat)


# Fused tensors whose pieces interleave head by head instead of following each other: BLOOM's query_key_value.
_HEAD_INTERLEAVED = (".query_key_value.weight", ".query_key_value.bias")


def params_to_hf(params, config) -> dict[str, np.ndarray]:
  """The run's params (whole `config`) as Hugging Face weight names -> float32 arrays in HF layouts."""
  m = config.model
  flat = {p: np.asarray(v, np.float32) for p, v in flatten(jax.device_get(_unbox(params))).items()}
  _check(flat, expected_params(config), "the run's parameters")
  if m.scan_layers:
    flat = _unstack_layers(flat, m.num_layers, _stack_name(m))
  state, pieces = {}, {}
  for hf_key, path, _, to_hf in _table(m):
    path, _, expert = (path or "").partition("#")
    value = (flat[path][int(expert)] if expert else flat[path]) if path else None
    value = to_hf(value) if to_hf else value
    key, _, index = hf_key.partition("#")
    if index:
      pieces.setdefault(key, {})[int(index)] = value
    else:
      state[key] = value
  for key, parts in pieces.items():
    ordered = [parts[j] for j in sorted(parts)]
    if key.endswith(_HEAD_INTERLEAVED):
      stacked = np.stack(ordered, axis=1)  # N x pieces x H (x D)
      state[key] = stacked.reshape(-1, *stacked.shape[3:])
    else:
      state[key] = np.concatenate(ordered, axis=-1)
  return {k: np.ascontiguousarray(v) for k, v in state.items()}


# --- directories ------------------------------------------------------------------------------------


def read_hf(directory) -> tuple[config_lib.ConfigDict, dict]:
  """(jaxlm config, params) from a HF directory with config.json and model.safetensors."""
  from safetensors.numpy import load, load_file  # local: only conversion needs safetensors

  directory = fs.path(directory)  # a local folder or gs://
  for name in ("config.json", "model.safetensors"):
    if not (directory / name).is_file():
      raise ConvertError(
        f"{directory / name} not found; --from-hf takes a directory written by save_pretrained "
        "(sharded or .bin checkpoints are not supported)"
      )
  config = config_from_hf(json.loads((directory / "config.json").read_text()))
  weights = directory / "model.safetensors"
  return config, params_from_hf(load(weights.read_bytes()) if fs.is_url(weights) else load_file(weights), config)


def write_hf(params, config, out, tokenizer=None) -> Path:
  """config.json, model.safetensors and, given the run's `tokenizer`, its bos/eos/pad ids in config.json and a
  generation_config.json, so that HF `generate` stops at jaxlm's end-of-text token."""
  from safetensors.numpy import save, save_file

  out = fs.path(out)  # a local folder or gs://
  fs.makedirs(out)
  hf_config = config_to_hf(config.model)
  state = params_to_hf(params, config)
  if fs.is_url(out):  # a bucket takes whole objects: serialize in memory
    (out / "model.safetensors").write_bytes(save(state, metadata={"format": "pt"}))
  else:
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
  if tokenizer is not None:
    special = {
      "bos_token_id": int(tokenizer.bos_id),
      "eos_token_id": int(tokenizer.eos_id),
      "pad_token_id": int(tokenizer.pad_id),
    }
    hf_config.update(special)
    (out / "generation_config.json").write_text(json.dumps(special, indent=2))
    if hasattr(tokenizer, "write_hf_files"):  # a Hugging Face tokenizer goes back beside the weights
      tokenizer.write_hf_files(out)
  (out / "config.json").write_text(json.dumps(hf_config, indent=2))
  if not fs.is_url(out):  # safetensors creates its file with mode 0600: give it config.json's (the umask's)
    os.chmod(out / "model.safetensors", os.stat(out / "config.json").st_mode & 0o777)
  return out


def import_run(hf_dir, workdir) -> Path:
  """Writes a jaxlm run from a HF directory; see `write_run`. A tokenizer.json beside the weights becomes the
  run's tokenizer (jaxlm/data/hf_tokenizer.py); without one the run gets the byte tokenizer."""
  from jaxlm.data import hf_tokenizer
  from jaxlm.data import tokenizer as tokenizer_lib

  config, params = read_hf(hf_dir)
  if (fs.path(hf_dir) / "tokenizer.json").is_file():
    tokenizer = hf_tokenizer.HuggingFaceTokenizer(hf_dir)
    if config.model.vocab_size < tokenizer.vocab_size:
      raise ConvertError(
        f"{fs.path(hf_dir) / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's "
        f"vocab_size is {config.model.vocab_size}; they must come from the same checkpoint"
      )
    config.data.tokenizer = "huggingface"
    config.data.tokenizer_path = str(fs.absolute(workdir) / hf_tokenizer.FOLDER)
    return write_run(config, params, workdir, tokenizer)
  if config.model.vocab_size < tokenizer_lib.ByteTokenizer.vocab_size:
    raise ConvertError(
      f"the HF model's vocab_size {config.model.vocab_size} is below the byte tokenizer's "
      f"{tokenizer_lib.ByteTokenizer.vocab_size}; HF tokenizers are not converted, so jaxlm "
      "needs a vocabulary of at least 260 ids"
    )
  return write_run(config, params, workdir)


def write_run(config, params, workdir, tokenizer=None) -> Path:
  """A run directory usable by train/eval/generate/serve: config.json, `tokenizer` (default: the byte
  tokenizer), and an Orbax checkpoint at step 0 holding `params` with a fresh optimizer state (the normal
  TrainState layout), as `jaxlm.save` writes it."""
  from jaxlm.data import tokenizer as tokenizer_lib
  from jaxlm.storage import run_dir
  from jaxlm.training import saving

  workdir = fs.path(workdir)
  if run_dir.has_checkpoints(workdir):
    raise ConvertError(f"{run_dir.checkpoints_path(workdir)} already holds checkpoints; pass an empty --workdir")
  return saving.save(workdir, config, params, tokenizer or tokenizer_lib.ByteTokenizer())


def export_run(workdir, out, step: int | None = None) -> Path:
  """`jaxlm convert --to-hf`: loads the run in `workdir` (latest or `step`) and writes a HF folder at `out`."""
  from jaxlm import loader  # local: keeps the converter's import light

  run = loader.load(workdir, step)
  return write_hf(run.params, run.config, out, run.tokenizer)
