"""The encoder-decoder (model.EncoderDecoder) and its data (tasks.seq2seq): masks, causality, packing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import seq2seq
from jaxlm.training import step as train_lib

PAIRS = [
  ("def add(a, b): return a + b", "Add two numbers."),
  ("def f(): pass", "Do nothing at all."),
  ("class A: x = 1", "A class with one attribute, x."),
  ("import os", "Import the os module."),
]


def seq2seq_config(**overrides):
  c = tiny_config(
    family="encoder_decoder", position="sinusoidal", norm_position="post", scale_embeddings=True, **overrides
  )
  c.data.seq_len, c.data.target_len = 48, 40
  return c


def _init(cfg, batch):
  module = model_lib.build(cfg)
  # jit: traced once, this is seconds instead of the tens of seconds of op-by-op dispatch.
  return module, jax.jit(module.init)(jax.random.key(0), **model_lib.model_inputs(cfg, batch))["params"]


def test_gradients_flow_causally_on_the_decoder_side_and_never_from_source_padding():
  cfg = seq2seq_config().model
  S, T, t = 10, 7, 3
  src_lengths = jnp.array([10, 6])  # row 1 has 4 padding positions
  input_segment_ids = (jnp.arange(S)[None] < src_lengths[:, None]).astype(jnp.int32)
  batch = {
    "inputs": jax.random.randint(jax.random.key(1), (2, S), 4, 260) * input_segment_ids,
    "input_segment_ids": input_segment_ids,
    "input_positions": jnp.broadcast_to(jnp.arange(S), (2, S)),
    "decoder_inputs": jax.random.randint(jax.random.key(2), (2, T), 4, 260),
    "segment_ids": jnp.ones((2, T), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(T), (2, T)),
  }
  module, params = _init(cfg, batch)

  def logit_sum(delta_src_BxSxD, delta_tgt_BxTxD):
    # Adds a differentiable offset to the embeddings, told apart by length (S != T).
    def add_offset(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "embed":
        out = out + (delta_src_BxSxD if out.shape[1] == S else delta_tgt_BxTxD)
      return out

    with nn.intercept_methods(add_offset):
      logits = module.apply({"params": params}, **model_lib.model_inputs(cfg, batch))
    return logits[:, t].sum()

  grad_src, grad_tgt = jax.jit(jax.grad(logit_sum, argnums=(0, 1)))(jnp.zeros((2, S, 32)), jnp.zeros((2, T, 32)))
  tgt_norm_BxT = jnp.linalg.norm(grad_tgt, axis=-1)
  assert jnp.all(tgt_norm_BxT[:, : t + 1] > 0)
  assert jnp.all(tgt_norm_BxT[:, t + 1 :] == 0)  # later target tokens are invisible
  src_norm_BxS = jnp.linalg.norm(grad_src, axis=-1)
  assert jnp.all(src_norm_BxS[0] > 0)  # every source token of an unpadded row is read
  assert jnp.all(src_norm_BxS[1, :6] > 0)
  assert jnp.all(src_norm_BxS[1, 6:] == 0)  # padding never reaches the output


def test_packed_and_unpacked_losses_are_equal():
  config = seq2seq_config()
  tokenizer = ByteTokenizer()
  packed = seq2seq.Seq2SeqRows(PAIRS, tokenizer, 48, 40, pack=True)
  unpacked = seq2seq.Seq2SeqRows(PAIRS, tokenizer, 48, 40, pack=False)
  assert len(packed) < len(unpacked) == len(PAIRS)  # packing did combine pairs
  collate = lambda rows: {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  packed_batch = collate([packed[i] for i in range(len(packed))])
  unpacked_batch = collate([unpacked[i] for i in range(len(unpacked))])
  module, params = _init(config.model, packed_batch)
  batch_sums = jax.jit(lambda p, b: train_lib.batch_sums(module, p, b, config.train))
  sums = [batch_sums(params, b) for b in (packed_batch, unpacked_batch)]
  assert float(sums[0]["weight_sum"]) == float(sums[1]["weight_sum"])
  np.testing.assert_allclose(float(sums[0]["loss_sum"]), float(sums[1]["loss_sum"]), rtol=1e-5)


def test_rows_shift_targets_and_restart_positions_per_pair():
  rows = seq2seq.Seq2SeqRows(PAIRS[:2], ByteTokenizer(), 48, 40, pack=True)
  row = rows[0]
  target_1 = ByteTokenizer().encode(PAIRS[0][1])
  n = len(target_1) + 1  # + EOS
  assert list(row["segment_ids"][: n + 2]) == [1] * n + [2, 2]
  assert row["decoder_inputs"][0] == ByteTokenizer.bos_id and row["decoder_inputs"][n] == ByteTokenizer.bos_id
  np.testing.assert_array_equal(row["decoder_inputs"][1:n], row["targets"][: n - 1])
  assert row["targets"][n - 1] == ByteTokenizer.eos_id and row["positions"][n] == 0
  assert row["weights"].sum() == np.count_nonzero(row["segment_ids"])
  assert set(row) == set(rows.padding_row())


@pytest.mark.parametrize("length", [5, 48])
def test_long_sides_are_truncated_with_eos_kept(length):
  rows = seq2seq.Seq2SeqRows([("x" * 100, "y" * 100)], ByteTokenizer(), length, length, pack=False)
  row = rows[0]
  assert row["inputs"][length - 1] == ByteTokenizer.eos_id and row["targets"][length - 1] == ByteTokenizer.eos_id
