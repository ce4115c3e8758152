"""Introspection through public names: input-gradient saliency, attention weights, hidden states."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

import jaxlm
from jaxlm.models import transformer as model_lib

TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 260, (2, 12)))


@pytest.fixture(scope="module")
def decoder():
  """The tiny decoder with attention weights sown, and its parameters."""
  model = model_lib.build(tiny_config(sow_attention_weights=True).model)
  return model, jax.jit(model.init)(jax.random.key(0), TOKENS)


def test_saliency_and_layer_1_attention_weights_in_a_few_lines(decoder):
  model, variables = decoder
  # Input-gradient saliency of the last position's top logit, per input token.
  embeds = model.apply(variables, TOKENS, method=model.token_embeddings)
  top_logit = lambda e: model.apply(variables, inputs_embeds_BxTxD=e)[0, -1].max()
  saliency_T = jnp.linalg.norm(jax.jit(jax.grad(top_logit))(embeds)[0], axis=-1)
  # Layer 1's attention weights, B x N x T x T.
  _, state = model.apply(variables, TOKENS, mutable="intermediates")
  weights = state["intermediates"]["decoder"]["layer_1"]["self_attention"]["attention_weights"][0]

  assert saliency_T.shape == (12,) and bool(jnp.all(saliency_T > 0))  # every earlier token matters
  assert weights.shape == (2, 4, 12, 12)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(jnp.triu(weights, k=1)).max()) == 0.0  # causal: no weight on later tokens


def test_introspection_leaves_the_logits_alone(decoder):
  """Token embeddings passed as inputs_embeds, and the sown (XLA) attention, give the usual logits."""
  model, variables = decoder
  plain = model_lib.build(tiny_config().model)
  reference = jax.jit(plain.apply)(variables, TOKENS)
  embeds = model.apply(variables, TOKENS, method=model.token_embeddings)
  np.testing.assert_allclose(jax.jit(model.apply)(variables, TOKENS), reference, atol=1e-5)
  np.testing.assert_allclose(model.apply(variables, inputs_embeds_BxTxD=embeds), reference, atol=1e-5)
  with pytest.raises(ValueError, match="exactly one"):
    model.apply(variables, TOKENS, inputs_embeds_BxTxD=embeds)


def test_hidden_states_unrolled_and_scanned():
  """num_layers + 1 hidden states (embeddings, then each block); the scanned stack gives the same ones,
  and its sown weights carry a leading layer axis."""
  cfg = tiny_config(sow_attention_weights=True).model
  model = model_lib.build(cfg)
  variables = jax.jit(model.init)(jax.random.key(1), TOKENS)
  logits, hidden = model.apply(variables, TOKENS, return_hidden_states=True)
  assert len(hidden) == cfg.num_layers + 1 and all(h.shape == (2, 12, cfg.d_model) for h in hidden)
  np.testing.assert_allclose(logits, model.apply(variables, TOKENS), atol=1e-6)
  assert float(jnp.abs(hidden[1] - hidden[0]).max()) > 0

  scanned = model_lib.build(tiny_config(sow_attention_weights=True, scan_layers=True).model)
  params = nn.meta.unbox(variables["params"])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params["decoder"][f"layer_{i}"] for i in range(2)])
  scan_params = {**params, "decoder": {"layers": {"block": stacked}}}
  (_, hidden_scanned), state = scanned.apply(
    {"params": scan_params}, TOKENS, return_hidden_states=True, mutable="intermediates"
  )
  for a, b in zip(hidden, hidden_scanned):
    np.testing.assert_allclose(a, b, atol=1e-5)
  _, unrolled_state = model.apply(variables, TOKENS, mutable="intermediates")
  weights_LxBxNxTxT = state["intermediates"]["decoder"]["layers"]["block"]["self_attention"]["attention_weights"][0]
  np.testing.assert_allclose(
    weights_LxBxNxTxT[1],
    unrolled_state["intermediates"]["decoder"]["layer_1"]["self_attention"]["attention_weights"][0],
    atol=1e-6,
  )


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": True, "position": "alibi"}])
def test_attention_weights_of_the_model_as_built(overrides):
  """`jaxlm.attention_weights` on a model built without `sow_attention_weights`: one B x N x T x T array per
  layer, equal to what the flag sows (the bias included), for an unrolled or a scanned stack."""
  config = tiny_config(**overrides)
  model = model_lib.build(config.model)
  params = jax.jit(model.init)(jax.random.key(0), TOKENS)["params"]
  weights = jaxlm.attention_weights(model, params, TOKENS)
  assert len(weights) == 2 and all(w.shape == (2, 4, 12, 12) for w in weights)
  np.testing.assert_allclose(weights[1].sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(weights[0] - weights[1]).max()) > 0
  config.model.sow_attention_weights = True
  _, state = model_lib.build(config.model).apply({"params": params}, TOKENS, mutable="intermediates")
  stack = state["intermediates"]["decoder"]
  sown = (
    list(stack["layers"]["block"]["self_attention"]["attention_weights"][0])
    if "layers" in stack
    else [stack[f"layer_{i}"]["self_attention"]["attention_weights"][0] for i in range(2)]
  )
  for got, want in zip(weights, sown):
    np.testing.assert_allclose(got, want, atol=1e-6)
