"""The research API (issue 22 A): a loss's extra terms, `jaxlm.save`, `jaxlm.init`, LoRA from Python, own token
ids below the tokenizer's vocabulary, `trainer.model` and `trainer.logits`, quiet restores, a byte run's
Hugging Face tokenizer."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import tiny_config

import jaxlm
from jaxlm import loader
from jaxlm.cli import main
from jaxlm.config import ConfigError
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.loader import RunError
from jaxlm.models import lora
from jaxlm.training import report
from jaxlm.training import step as train_step
from jaxlm.training.saving import SaveError


def id_batches(config, vocab: int, seed: int = 0, count: int | None = None):
  """Batches of token ids below `vocab`; odd rows half padded, so micro-batches hold unequal weights."""
  rng = np.random.default_rng(seed)
  shape = (config.train.global_batch_size, config.data.seq_len)
  index = 0
  while count is None or index < count:
    tokens = rng.integers(4, vocab, (shape[0], shape[1] + 1)).astype(np.int32)
    weights = np.ones(shape, np.float32)
    weights[1::2, shape[1] // 2 :] = 0.0
    yield {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones(shape, np.int32),
      "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
      "weights": weights,
    }
    index += 1


def short_config(vocab_size: int = 260, steps: int = 2):
  config = tiny_config(vocab_size=vocab_size)
  config.train.num_steps = config.train.checkpoint_every = config.train.eval_every = steps
  return config


def with_terms(model, params, batch, rngs):
  """Cross-entropy plus two reported terms: 'aux' depends on the batch only, so its value is known exactly."""
  sums = jaxlm.cross_entropy_loss(short_config().train)(model, params, batch, rngs)
  sums["aux_sum"] = jnp.sum(batch["weights"] * (batch["inputs"] % 7))
  sums["z_sq_sum"] = sums["loss_sum"] * 0.5
  return sums


def aux_of(batches) -> float:
  """'aux' as the sums define it, over whole batches: the weighted sum divided by the summed weight."""
  total = sum(float(np.sum(b["weights"] * (b["inputs"] % 7))) for b in batches)
  return total / sum(float(np.sum(b["weights"])) for b in batches)


class Keep(jaxlm.Callback):
  def __init__(self):
    self.steps, self.evals, self.accuracy = {}, {}, None

  def on_step(self, trainer, step, metrics):
    self.steps[step] = metrics

  def on_eval(self, trainer, step, metrics):
    self.evals[step] = metrics
    batch = next(id_batches(trainer.config, trainer.config.model.vocab_size, seed=1))
    logits_BxTxV = trainer.logits(batch)  # the model the config built, under the run's mesh and rules
    self.shape = logits_BxTxV.shape
    self.accuracy = float(np.mean(np.argmax(np.asarray(logits_BxTxV), -1) == batch["targets"]))


def test_extra_loss_terms_are_logged_exactly_across_micro_batches(tmp_path, capsys):
  config = short_config()
  config.train.global_batch_size, config.train.num_micro_batches = (
    16,
    2,
  )  # micro-batch 1 holds the half-padded rows: means of means would differ
  train, evaluation = list(id_batches(config, 260, count=2)), list(id_batches(config, 260, seed=3, count=2))
  keep = Keep()
  summary = jaxlm.train(config, tmp_path, train_data=train, eval_data=evaluation, loss_fn=with_terms, callbacks=[keep])
  np.testing.assert_allclose(keep.steps[1]["aux"], aux_of(train[:1]), rtol=1e-6)
  np.testing.assert_allclose(keep.steps[2]["aux"], aux_of(train[1:]), rtol=1e-6)
  np.testing.assert_allclose(keep.steps[2]["z_sq"], 0.5 * keep.steps[2]["objective"], rtol=1e-6)
  np.testing.assert_allclose(keep.evals[2]["val_aux"], aux_of(evaluation), rtol=1e-6)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"aux", "z_sq"} <= set(rows[0]) and any("val_aux" in row for row in rows)
  assert summary["val_aux"] == keep.evals[2]["val_aux"] and summary["aux"] == keep.steps[2]["aux"]
  err = capsys.readouterr().err
  assert any(line.startswith("step 2:") and " aux " in line for line in err.splitlines()), err[-2000:]
  assert "validation loss" in err and "val_aux" in err


def test_loss_fn_is_a_documented_protocol_and_bad_sums_are_one_line(tmp_path):
  assert "NAME_sum" in jaxlm.LossFn.__call__.__doc__ and "Returns:" in jaxlm.LossFn.__call__.__doc__
  base = {"loss_sum": jnp.zeros(()), "weight_sum": jnp.ones(())}
  train_step.check_sums(base | {"aux_sum": jnp.zeros(())})
  for extra, message in (
    ({"aux": 0.0}, "'aux': every key must be a token-weighted sum named NAME_sum"),
    ({"grad_norm_sum": 0.0}, "'grad_norm' is the trainer's own"),
    ({"aux_sum": jnp.zeros(3)}, "'aux_sum' of shape \\(3,\\)"),
  ):
    with pytest.raises(train_step.LossFnError, match=message):
      train_step.check_sums(base | extra)
  with pytest.raises(train_step.LossFnError, match="no 'weight_sum'"):
    train_step.check_sums({"loss_sum": 0.0})
  config = short_config(steps=1)
  with pytest.raises(train_step.LossFnError, match="'aux': every key"):  # surfaces from compilation, unwrapped
    bad = lambda model, params, batch, rngs: {**with_terms(model, params, batch, rngs), "aux": jnp.zeros(())}
    jaxlm.Trainer(config, tmp_path, train_data=id_batches(config, 260), loss_fn=bad).run()


def test_own_token_ids_below_the_tokenizers_vocabulary(tmp_path):
  config = short_config(vocab_size=114)  # the grokking example: p = 113, ids 0..113
  keep = Keep()
  trainer = jaxlm.Trainer(
    config,
    tmp_path / "ids",
    train_data=id_batches(config, 114),
    eval_data=list(id_batches(config, 114, seed=2, count=1)),
    callbacks=[keep],
  )
  trainer.run()
  assert isinstance(trainer.model, jaxlm.DecoderLM) and keep.shape[-1] == 114 and 0 <= keep.accuracy <= 1
  assert jaxlm.load(tmp_path / "ids").params["embedder"]["token"]["embedding"].shape[0] == 114
  # A tokenizer in play still needs the vocabulary to hold its ids.
  too_small = "model.vocab_size=114 is smaller than the tokenizer's 260"
  with pytest.raises(ConfigError, match=too_small):
    jaxlm.train(config, tmp_path / "text", train_data=["some text"] * 4)
  with pytest.raises(ConfigError, match=too_small):
    jaxlm.train(config, tmp_path / "given", train_data=id_batches(config, 114), tokenizer=ByteTokenizer())
  assert not (tmp_path / "text" / "config.json").exists()


def test_init_count_save_and_load_back(tmp_path, capsys):
  config = short_config()
  model, params = jaxlm.init(config, seed=3)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jax.Array))
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)  # unboxed: no LogicallyPartitioned
  assert jaxlm.count_params(params) == report.parameter_counts(params)[0] == sum(x.size for x in leaves) > 0
  assert jaxlm.count_params(jaxlm.init(config.model, seed=3)[1]) == jaxlm.count_params(params)
  jaxlm.save(tmp_path / "run", config, params)
  run = jaxlm.load(tmp_path / "run")
  assert run.step == 0 and isinstance(run.tokenizer, ByteTokenizer)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), jax.device_get(params))
  assert main.main(["verify", "--workdir", str(tmp_path / "run")]) == 0  # checksummed like a trained run
  assert main.main(["generate", "--workdir", str(tmp_path / "run"), "--prompt", "def", "--max-tokens", "3"]) == 0
  jaxlm.save(tmp_path / "copy", run, step=7)  # a loaded Run
  assert jaxlm.load(tmp_path / "copy").step == 7
  with pytest.raises(SaveError, match="already holds checkpoints; save into a new or empty folder"):
    jaxlm.save(tmp_path / "run", run)
  with pytest.raises(SaveError, match="do not fit the model of config.model: 'decoder/.*' is missing; .*model="):
    jaxlm.save(tmp_path / "bad", config, {"w": jnp.zeros(3)})
  with pytest.raises(SaveError, match="params is missing"):
    jaxlm.save(tmp_path / "bad", config)


def test_lora_from_python_trains_merges_saves_and_load_names_model(tmp_path, caplog):
  config = short_config(steps=2)  # step 1 is warm-up at learning rate 0
  _, base = jaxlm.init(config, seed=0)
  model, adapters = jaxlm.apply_lora(config, base, rank=2, targets="query,value")
  assert jaxlm.count_params(adapters) < jaxlm.count_params(base) / 4
  jaxlm.train(config, tmp_path / "lora", model=model, train_data=id_batches(config, 260))
  with pytest.raises(RunError, match=r"lacks .* array\(s\).*jaxlm.load\(workdir, model=that_module\)"):
    jaxlm.load(tmp_path / "lora")
  trained = jaxlm.load(tmp_path / "lora", model=model).params
  merged = jaxlm.merge_lora(model, trained)
  layer = lambda tree, name: np.asarray(tree["decoder"]["layer_0"]["self_attention"][name]["kernel"])
  assert not np.allclose(layer(merged, "query"), layer(base, "query"))
  np.testing.assert_array_equal(layer(merged, "key"), layer(base, "key"))
  batch = next(id_batches(config, 260))
  family = jaxlm.build_model(config.model)
  inputs = dict(tokens_BxT=batch["inputs"], segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"])
  np.testing.assert_allclose(
    family.apply({"params": merged}, **inputs),
    model.clone(deterministic=True).apply({"params": trained}, **inputs),
    atol=1e-5,
  )
  jaxlm.save(tmp_path / "merged", config, merged)
  # A LoRA run's base (here the saved merge) is checked and restored without Orbax's read-only warnings, and
  # logging is left as it was.
  level = logging.getLogger("absl").level
  adapt = short_config()
  adapt.lora.rank, adapt.lora.base_workdir = 2, str(tmp_path / "merged")
  caplog.clear()
  with caplog.at_level("WARNING"):
    resolved = lora.resolve_base(adapt, log=lambda line: None)
    restored = lora.base_params(resolved, loader.single_device_mesh())
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert logging.getLogger("absl").level == level
  np.testing.assert_array_equal(layer(restored, "query"), layer(merged, "query"))


def test_byte_run_exports_a_tokenizer_that_transformers_loads(tmp_path):
  transformers = pytest.importorskip("transformers")
  config = short_config()
  jaxlm.save(tmp_path / "run", config, jaxlm.init(config)[1])
  assert main.main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  byte = ByteTokenizer()
  text = "déf f(x):\n\treturn x  # ünïcode 😀 <s></s>"
  ids = hf(text)["input_ids"]
  assert ids == byte.encode(text).tolist() and hf.decode(ids) == text == byte.decode(ids)
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (0, 1, 2, 260)
  assert hf.decode([1, *ids, 2], skip_special_tokens=True) == text
