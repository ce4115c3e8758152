"""BERT masking (mlm.py): proportions, determinism, what may be masked; and the MLM head's layout."""

import flax.linen as nn
import jax
import numpy as np
from support import tiny_config

from jaxlm.data import pipeline as data_lib
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import mlm


def _rows(seed=0, probability=0.15):
  tokenizer = ByteTokenizer()
  documents = [bytes(np.random.default_rng(i).integers(32, 127, 300, dtype=np.uint8)) for i in range(60)]
  stream = data_lib.TokenStream.from_documents(documents, tokenizer)
  return mlm.MlmRows(data_lib.PackedRows(stream, 64), tokenizer, probability, seed)


def test_masking_proportions():
  rows = _rows()
  chosen = masked = randomized = kept = maskable = 0
  for i in range(len(rows)):
    row = rows[i]
    real = (row["targets"] >= ByteTokenizer.offset) & (row["segment_ids"] > 0)
    maskable += real.sum()
    pick = row["weights"] > 0
    assert not np.any(pick & ~real)  # EOS and padding are never chosen
    assert pick.sum() == round(0.15 * real.sum())
    chosen += pick.sum()
    masked += np.sum(pick & (row["inputs"] == ByteTokenizer.mask_id))
    kept += np.sum(pick & (row["inputs"] == row["targets"]))
    randomized += np.sum(pick & (row["inputs"] != row["targets"]) & (row["inputs"] != ByteTokenizer.mask_id))
    assert np.all(row["inputs"][~pick] == row["targets"][~pick])  # unchosen tokens are untouched
  assert abs(chosen / maskable - 0.15) < 0.01
  # About 4000 chosen tokens: the binomial standard deviation of a 10% share is under 0.5%.
  assert abs(masked / chosen - 0.8) < 0.03
  # A random replacement equal to the original counts as kept: 1/95 of 10% moves over.
  assert abs(randomized / chosen - 0.1) < 0.03 and abs(kept / chosen - 0.1) < 0.03


def test_masks_are_a_function_of_seed_and_row():
  a, b, other = _rows(seed=0), _rows(seed=0), _rows(seed=1)
  np.testing.assert_array_equal(a[5]["inputs"], b[5]["inputs"])
  assert not np.array_equal(a[5]["weights"], other[5]["weights"])
  assert not np.array_equal(a[5]["weights"], a[6]["weights"])  # rows draw their own masks


def test_unigram_baseline_counts_masked_targets():
  rows = _rows()
  token = mlm.unigram_token(rows)
  assert token >= ByteTokenizer.offset
  accuracy = mlm.unigram_accuracy(rows, token)
  # Uniform random printable bytes: about 1/95 of targets equal any one token.
  assert 0.0 < accuracy < 0.05


def test_encoder_has_bert_mlm_head_and_embedding_norm():
  cfg = tiny_config(family="encoder", norm_position="post", embed_norm=True, num_token_types=2).model
  batch = model_lib.example_batch(cfg, (2, 8))
  params = nn.meta.unbox(model_lib.build(cfg).init(jax.random.key(0), **model_lib.model_inputs(cfg, batch))["params"])
  assert set(params["mlm_head"]) == {"transform", "transform_norm", "bias"}
  assert params["mlm_head"]["bias"].shape == (cfg.vocab_size,)
  assert "embed_norm" in params["embedder"] and "token_type" in params["embedder"]
  assert "final_norm" not in params  # post-norm stacks end normalized
