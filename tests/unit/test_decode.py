"""Cached decoding: parity with the uncached forward pass, mixed-length batches, sampling, beam search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.inference import decode
from jaxlm.models import transformer as model_lib

STYLES = {
  "gpt2": {},
  "llama_gqa": dict(
    norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, tie_embeddings=False, num_kv_heads=2
  ),
  "scan": dict(scan_layers=True, position="rope"),
}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [30]]


def jitted(adapter):
  """The adapter's prefill and step, jitted: eager Flax dispatches op by op and is slow on CPU."""
  return jax.jit(adapter.prefill, static_argnums=2), jax.jit(adapter.step)


def build(style="gpt2", **overrides):
  cfg = tiny_config(**STYLES[style], **overrides).model
  tokens = jnp.ones((1, 8), jnp.int32)
  return cfg, model_lib.build(cfg).init(jax.random.key(0), tokens)["params"]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cached_logits_equal_uncached_at_every_position(style):
  cfg, params = build(style)
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 24), 4, 260)
  full_BxTxV = jax.jit(model_lib.build(cfg).apply)({"params": params}, tokens_BxT)
  prefill, step = jitted(decode.adapter_for(cfg))
  prompt_len = 10
  logits_BxPxV, _, state = prefill(
    params, {"tokens_BxP": tokens_BxT[:, :prompt_len], "lengths_B": jnp.array([prompt_len] * 2)}, 32
  )
  np.testing.assert_allclose(logits_BxPxV, full_BxTxV[:, :prompt_len], atol=1e-5)
  for t in range(prompt_len, 24):
    logits_BxV, state = step(params, state, tokens_BxT[:, t])
    np.testing.assert_allclose(logits_BxV, full_BxTxV[:, t], atol=1e-5, err_msg=f"position {t}")


def test_mixed_length_prefill_matches_each_prompt_alone():
  cfg, params = build("llama_gqa")
  module = model_lib.build(cfg)
  tokens_BxP, lengths_B = decode.pad_prompts(PROMPTS, len(PROMPTS))
  tokens_BxP[tokens_BxP == 0] = 99  # padding content must not matter either
  logits_BxPxV, next_BxV, _ = jitted(decode.adapter_for(cfg))[0](
    params, {"tokens_BxP": jnp.asarray(tokens_BxP), "lengths_B": jnp.asarray(lengths_B)}, 64
  )
  for i, prompt in enumerate(PROMPTS):
    alone = jax.jit(module.apply)({"params": params}, jnp.asarray([prompt]))[0]
    np.testing.assert_allclose(logits_BxPxV[i, : len(prompt)], alone, atol=1e-5)
    np.testing.assert_allclose(next_BxV[i], alone[-1], atol=1e-5)


@pytest.mark.parametrize(
  "sampling", [decode.Sampling(), decode.Sampling(temperature=0.9, top_k=20, top_p=0.9, seed=[3, 4, 5])]
)
def test_mixed_batch_generates_what_each_prompt_generates_alone(sampling):
  cfg, params = build("gpt2")
  generator = decode.Generator(cfg, params)
  together = generator.generate(PROMPTS, 12, sampling)
  for i, prompt in enumerate(PROMPTS):
    alone_sampling = decode.Sampling(
      sampling.temperature, sampling.top_k, sampling.top_p, np.broadcast_to(sampling.seed, (3,))[i]
    )
    assert generator.generate([prompt], 12, alone_sampling)[0] == together[i]
  assert len({tuple(t) for t in together}) == 3


def test_one_compiled_step_serves_every_token():
  cfg, params = build("gpt2")
  generator = decode.Generator(cfg, params, cache_len=64)
  first = generator.generate([[5, 6, 7]], 30)
  assert len(first) == 1 and len(first[0]) == 30
  generator.generate([[9, 8, 7, 6, 5, 4]], 20)  # another prompt length in the same bucket
  assert generator.step._cache_size() == 1
  assert generator.prefill._cache_size() == 1


def test_seeded_sampling_is_reproducible_and_seed_dependent():
  cfg, params = build("gpt2")
  generator = decode.Generator(cfg, params)
  run = lambda seed: generator.generate([[5, 6, 7]], 16, decode.Sampling(temperature=1.0, seed=seed))[0]
  assert run(1) == run(1)
  assert run(1) != run(2)
  greedy = generator.generate([[5, 6, 7]], 16)[0]
  assert generator.generate([[5, 6, 7]], 16, decode.Sampling(temperature=1.0, top_k=1, seed=7))[0] == greedy
  assert generator.generate([[5, 6, 7]], 16, decode.Sampling(temperature=1.0, top_p=1e-6, seed=7))[0] == greedy


def test_sample_filters():
  logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys_B = jax.random.split(jax.random.key(0), 2000)
  ones = jnp.ones(2000)
  top2 = decode.sample(logits_BxV, keys_B, ones, jnp.full(2000, 2), ones)
  assert set(np.unique(top2)) == {0, 1}
  top_p = decode.sample(logits_BxV, keys_B, ones, jnp.zeros(2000, jnp.int32), jnp.full(2000, 0.7))
  assert set(np.unique(top_p)) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
  free = np.asarray(decode.sample(logits_BxV, keys_B, ones, jnp.zeros(2000, jnp.int32), ones))
  assert set(np.unique(free)) == {0, 1, 2, 3}
  assert abs(np.mean(free == 0) - 0.5) < 0.05


def test_stop_tokens_and_max_tokens():
  cfg, params = build("gpt2")
  generator = decode.Generator(cfg, params)
  greedy = generator.generate([[5, 6, 7]], 10)[0]
  assert generator.generate([[5, 6, 7]], 10, stop_ids=[greedy[3]])[0] == greedy[: greedy.index(greedy[3])]
  outputs = list(generator.stream([[5, 6, 7], [8]], [4, 2]))
  assert len(outputs) == 4 and outputs[1].finished_B[1] and not outputs[1].finished_B[0]
  with pytest.raises(decode.DecodeError, match="max_tokens"):
    generator.generate([[5] * 60], 10)
  with pytest.raises(decode.DecodeError, match="empty"):
    generator.generate([[]], 10)


def test_beam_one_equals_greedy_and_beams_are_ranked():
  cfg, params = build("gpt2")
  generator = decode.Generator(cfg, params)
  greedy = generator.generate(PROMPTS, 12, stop_ids=[2])
  # With alpha 0 a width-1 beam follows the argmax; the EOS candidate only finishes it.
  searcher = decode.BeamSearcher(cfg, params)
  assert searcher.search(PROMPTS, beam_size=1, max_new_tokens=12, eos_id=2, alpha=0.0).tokens == greedy
  result = searcher.search(PROMPTS, beam_size=4, max_new_tokens=12, eos_id=2, alpha=0.6)
  for scores in result.all_scores:
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
  # Beams of one prompt decode alone to the same result as in the batch.
  alone = searcher.search(PROMPTS[1:2], beam_size=4, max_new_tokens=12, eos_id=2, alpha=0.6)
  assert alone.tokens[0] == result.tokens[1]
  assert alone.scores[0] == pytest.approx(result.scores[1], abs=1e-5)
  assert decode.length_penalty(1.0, 0.6) == pytest.approx(1.0)


def test_encoder_decoder_cached_parity_and_beam():
  cfg = tiny_config(family="encoder_decoder", position="sinusoidal").model
  src_BxS = jax.random.randint(jax.random.key(1), (2, 9), 4, 260)
  tgt_BxT = jax.random.randint(jax.random.key(2), (2, 7), 4, 260).at[:, 0].set(1)
  module = model_lib.build(cfg)
  params = module.init(jax.random.key(0), src_BxS, tgt_BxT)["params"]
  full_BxTxV = jax.jit(module.apply)({"params": params}, src_BxS, tgt_BxT)
  prefill, step = jitted(decode.adapter_for(cfg, start_id=1))
  logits_Bx1xV, _, state = prefill(params, {"tokens_BxP": src_BxS, "lengths_B": jnp.array([9, 9])}, 16)
  np.testing.assert_allclose(logits_Bx1xV[:, 0], full_BxTxV[:, 0], atol=1e-5)
  for t in range(1, 7):
    logits_BxV, state = step(params, state, tgt_BxT[:, t])
    np.testing.assert_allclose(logits_BxV, full_BxTxV[:, t], atol=1e-5)
  sources = [list(np.asarray(src_BxS[0])), list(np.asarray(src_BxS[1, :5]))]
  greedy = decode.Generator(cfg, params).generate(sources, 6, stop_ids=[2])
  assert decode.beam_search(cfg, params, sources, beam_size=1, max_new_tokens=6, alpha=0.0).tokens == greedy
