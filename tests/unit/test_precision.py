"""Mixed precision: bfloat16 compute with float32 master weights tracks a float32 run.

The presets train large models with `model.dtype='bfloat16'` and
`model.param_dtype='float32'` (jaxlm/config/presets.py): matrix multiplies in
bfloat16, norms, softmax and the loss in float32, and the weights, gradients
and optimizer moments in float32. Checked here on the tiny config over 50
steps of real text on 8 CPU devices (float32 on CPU runs XLA's code, as
bfloat16 does; the CPU kernels stand aside on a multi-device mesh).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

from jaxlm.data import corpus
from jaxlm.parallel import mesh as mesh_lib
from jaxlm.parallel import sharding
from jaxlm.training import step as train_step

STEPS = 50
# Over the 50 steps the loss falls from 5.52 to 3.35 nats; the largest gap between the bfloat16 and the
# float32 curves measured 0.0045 nats (step 43; jax 0.10.2 on CPU, 2026-11-29). The bound leaves 4x room
# for other XLA versions and still fails bfloat16 master weights (param_dtype='bfloat16', whose small
# updates round away): their gap measured 0.098 nats (step 9) in the same run.
TOLERANCE_NATS = 0.02


def text_batches(batch: int, seq_len: int) -> list[np.ndarray]:
  """STEPS batches of consecutive bytes of the standard library's source (the same for both runs)."""
  data = np.frombuffer(b"".join(corpus.read_text_bytes(p)[:20000] for p in corpus.stdlib_files()[:40]), np.uint8)
  rows = data[: STEPS * batch * (seq_len + 1)].astype(np.int32).reshape(STEPS, batch, seq_len + 1)
  return list(rows)


def train(dtype: str):
  """Losses of 50 steps, the final params' dtypes, and the logits' dtype of the model in `dtype`."""
  config = tiny_config(dtype=dtype, param_dtype="float32")
  config.train.num_steps = STEPS
  config.optim.warmup_steps = 5
  s = train_step.setup(config, mesh_lib.make_mesh(config))
  state = train_step.create_state(s, seed=0)
  step = train_step.make_train_step(s)
  b, t = config.train.global_batch_size, config.data.seq_len
  ones = np.ones((b, t), np.int32)
  losses = []
  for tokens in text_batches(b, t):
    batch = sharding.global_batch(
      {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": ones,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
        "weights": ones.astype(np.float32),
      },
      s.batch_sharding,
    )
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  example = jax.tree.map(lambda x: x[:1], batch)
  logits = jax.eval_shape(
    lambda p: s.model.apply(
      {"params": p},
      tokens_BxT=example["inputs"],
      segment_ids_BxT=example["segment_ids"],
      positions_BxT=example["positions"],
      rngs={"dropout": jax.random.key(0)},
    ),
    state.params,
  )
  return np.array(losses), {x.dtype for x in jax.tree.leaves(state.params)}, logits.dtype


@pytest.fixture(scope="module")
def runs():
  return {dtype: train(dtype) for dtype in ("float32", "bfloat16")}


@pytest.mark.slow
def test_bf16_computes_in_bf16_with_float32_master_weights(runs):
  _, param_dtypes, logits_dtype = runs["bfloat16"]
  assert param_dtypes == {jnp.dtype(jnp.float32)}
  assert logits_dtype == jnp.bfloat16
  assert runs["float32"][2] == jnp.float32


@pytest.mark.slow
def test_bf16_loss_tracks_float32(runs):
  f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
  assert f32[-1] < f32[0] - 1.0  # the model learns, so tracking is not trivial
  gap = np.abs(bf16 - f32)
  assert gap.max() <= TOLERANCE_NATS, f"largest gap {gap.max():.4f} nats at step {gap.argmax()}"
  assert not np.allclose(bf16, f32, atol=1e-6)  # the two runs really computed in different precisions
