"""ALiBi (`model.position='alibi'`, Press et al. 2022): the slopes, the bias, and cached decoding with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.inference import decode
from jaxlm.models import layers
from jaxlm.models import transformer as model_lib

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [30]]


@pytest.mark.parametrize(
  "heads, slopes",
  [
    (8, [2.0**-i for i in range(1, 9)]),  # the paper's 1/2, 1/4, ..., 1/256
    (4, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]),
    # Not a power of two: 4 heads' slopes, then every other slope of 8 heads (the paper's code, BLOOM).
    (6, [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]),
  ],
)
def test_slopes(heads, slopes):
  np.testing.assert_allclose(layers.alibi_slopes(heads), slopes, rtol=1e-7)


def test_the_bias_is_minus_slope_times_distance_within_each_packed_document():
  positions_BxT = jnp.asarray([[0, 1, 2, 0, 1]])  # two packed documents
  bias = layers.alibi_bias(positions_BxT, positions_BxT, 2)
  assert bias.shape == (1, 2, 5, 5)
  np.testing.assert_allclose(bias[0, 0, 2, :3], [-0.0625 * 2, -0.0625, 0.0])  # head 0's slope is 2^-4 of 2 heads
  np.testing.assert_allclose(bias[0, 1, 4, 3:], [-(2.0**-8), 0.0])


def test_alibi_has_no_position_table_and_a_bias_that_changes_the_logits():
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 260, (2, 12)))
  model = model_lib.build(tiny_config(position="alibi").model)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert "position" not in params["embedder"]
  logits = jax.jit(model.apply)({"params": params}, tokens)
  # The same layers with `score_bias` returning None (no positions at all): different logits.
  unbiased = model_lib.DecoderLM(model.cfg, attention_cls=NoBias)
  assert float(jnp.abs(logits - jax.jit(unbiased.apply)({"params": params}, tokens)).max()) > 1e-3


class NoBias(layers.Attention):
  def score_bias(self, q_positions_BxT, kv_positions_BxS):
    return None


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_the_uncached_forward_pass(scan):
  """Keys keep their positions in the cache ('cached_position'): every step's logits equal the full pass's, and a
  mixed-length batch (rows at different positions for the same slot) equals each prompt alone."""
  cfg = tiny_config(position="alibi", scan_layers=scan).model
  module = model_lib.build(cfg)
  params = module.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  adapter = decode.adapter_for(cfg)
  prefill, step = jax.jit(adapter.prefill, static_argnums=2), jax.jit(adapter.step)
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 20), 4, 260)
  full_BxTxV = jax.jit(module.apply)({"params": params}, tokens_BxT)
  logits_BxPxV, _, state = prefill(params, {"tokens_BxP": tokens_BxT[:, :8], "lengths_B": jnp.array([8, 8])}, 32)
  np.testing.assert_allclose(logits_BxPxV, full_BxTxV[:, :8], atol=1e-5)
  for t in range(8, 20):
    logits_BxV, state = step(params, state, tokens_BxT[:, t])
    np.testing.assert_allclose(logits_BxV, full_BxTxV[:, t], atol=1e-5, err_msg=f"position {t}")
  tokens_BxP, lengths_B = decode.pad_prompts(PROMPTS, len(PROMPTS))
  _, next_BxV, _ = prefill(params, {"tokens_BxP": jnp.asarray(tokens_BxP), "lengths_B": jnp.asarray(lengths_B)}, 32)
  for i, prompt in enumerate(PROMPTS):
    np.testing.assert_allclose(
      next_BxV[i], jax.jit(module.apply)({"params": params}, jnp.asarray([prompt]))[0, -1], atol=1e-5
    )


def test_beam_search_reorders_the_cached_positions_with_the_keys():
  """Beams of one prompt decode alone to what they decode in a batch (`decode.map_rows` moves 'cached_position'
  with the beams)."""
  cfg = tiny_config(position="alibi").model
  params = model_lib.build(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  searcher = decode.BeamSearcher(cfg, params)
  result = searcher.search(PROMPTS, beam_size=3, max_new_tokens=8, eos_id=2, alpha=0.6)
  alone = searcher.search(PROMPTS[1:2], beam_size=3, max_new_tokens=8, eos_id=2, alpha=0.6)
  assert alone.tokens[0] == result.tokens[1]
  assert alone.scores[0] == pytest.approx(result.scores[1], abs=1e-5)
