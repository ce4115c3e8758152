"""LoRA (jaxlm/models/lora.py): adapters over a CLI run, merging, what trains, optimizer state, save and load."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import REPO, error_line, files_config, run_cli, run_in_process

import jaxlm
from jaxlm import config as config_lib
from jaxlm import families, loader
from jaxlm.cli import main
from jaxlm.models import lora
from jaxlm.models import transformer as model_lib
from jaxlm.storage import run_dir

TINY = str(REPO / "configs" / "tiny.py")
TARGETS = "query,value,out,down"  # input axes first (query, value) and last (out, down), multi-axis and 2-D


@pytest.fixture(scope="module")
def base_run(cli_run):
  """The frozen base: the shared 6-step `jaxlm train` run (conftest.cli_run)."""
  return cli_run[0]


def lora_config(text_corpus, base_run):
  config = files_config(text_corpus)
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 8.0, TARGETS
  config.lora.base_workdir = str(base_run)
  config.optim.learning_rate, config.optim.warmup_steps = 3e-2, 0
  return config


class KeepState(jaxlm.Callback):
  def on_start(self, trainer, step):
    self.initial = jax.device_get(trainer.state.params)

  def on_end(self, trainer, summary):
    self.state = jax.device_get(trainer.state)


@pytest.fixture(scope="module")
def lora_run(text_corpus, base_run, tmp_path_factory):
  """(workdir, KeepState) of a 6-step LoRA run over `base_run`, trained in this process."""
  workdir = tmp_path_factory.mktemp("lora")
  keep = KeepState()
  jaxlm.train(lora_config(text_corpus, base_run), workdir, callbacks=[keep])
  return workdir, keep


def random_adapters(module, seed=1):
  """Adapters with both A and B random (a trained adapter, not the zero start)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs(module))["params"])
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(shapes))))
  return jax.tree.map(lambda s: 0.3 * jax.random.normal(next(keys), s.shape), shapes)


def inputs(module):
  return families.model_inputs(module, model_lib.example_batch(module.cfg, (2, 16)))


def test_zero_initialized_adapter_leaves_logits_unchanged(text_corpus, base_run):
  run = jaxlm.load(base_run)
  config = lora.resolve_base(lora_config(text_corpus, base_run))
  module = lora.adapted_model(config, run.params, deterministic=True)
  adapters = module.init(jax.random.key(3), **inputs(module))["params"]
  assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree.leaves(adapters))  # A is random
  base_logits = run.model.apply({"params": run.params}, **inputs(module))
  np.testing.assert_array_equal(module.apply({"params": adapters}, **inputs(module)), base_logits)


def test_merged_kernel_is_base_plus_adapter_path_and_logits_agree(text_corpus, base_run):
  run = jaxlm.load(base_run)
  config = lora.resolve_base(lora_config(text_corpus, base_run))
  module = lora.adapted_model(config, run.params, deterministic=True)
  adapters = random_adapters(module)
  scale = config.lora.alpha / config.lora.rank
  merged = lora.merge(run.params, adapters, dict(module.targets), scale)
  layer = merged["decoder"]["layer_0"]
  base_layer = run.params["decoder"]["layer_0"]
  x_BxD = jax.random.normal(jax.random.key(5), (3, 32))
  # query: kernel D x N x H; the adapter path is x A B reshaped to N x H.
  a, b = (
    adapters["decoder.layer_0.self_attention.query.lora_a"],
    adapters["decoder.layer_0.self_attention.query.lora_b"],
  )
  expected = jnp.einsum("bd,dnh->bnh", x_BxD, base_layer["self_attention"]["query"]["kernel"]) + scale * (
    x_BxD @ a @ b
  ).reshape(3, 4, 8)
  np.testing.assert_allclose(
    jnp.einsum("bd,dnh->bnh", x_BxD, layer["self_attention"]["query"]["kernel"]), expected, rtol=1e-5, atol=1e-5
  )
  # out: kernel N x H x D, its inputs are the heads.
  x_BxNxH = jax.random.normal(jax.random.key(6), (3, 4, 8))
  a, b = adapters["decoder.layer_0.self_attention.out.lora_a"], adapters["decoder.layer_0.self_attention.out.lora_b"]
  expected = (
    jnp.einsum("bnh,nhd->bd", x_BxNxH, base_layer["self_attention"]["out"]["kernel"])
    + scale * x_BxNxH.reshape(3, 32) @ a @ b
  )
  np.testing.assert_allclose(
    jnp.einsum("bnh,nhd->bd", x_BxNxH, layer["self_attention"]["out"]["kernel"]), expected, rtol=1e-5, atol=1e-5
  )
  # Untargeted parameters are the base's own arrays.
  np.testing.assert_array_equal(layer["mlp"]["up"]["kernel"], base_layer["mlp"]["up"]["kernel"])
  adapted_logits = module.apply({"params": adapters}, **inputs(module))
  merged_logits = run.model.apply({"params": merged}, **inputs(module))
  np.testing.assert_allclose(adapted_logits, merged_logits, rtol=1e-5, atol=1e-5)
  base_logits = run.model.apply({"params": run.params}, **inputs(module))
  assert np.abs(np.asarray(adapted_logits - base_logits)).max() > 1e-2


def test_dropout_drops_adapter_inputs_only_in_training(text_corpus, base_run):
  run = jaxlm.load(base_run)
  config = lora.resolve_base(lora_config(text_corpus, base_run))
  config.lora.dropout = 0.5
  training = lora.adapted_model(config, run.params, deterministic=False)
  adapters = random_adapters(training)
  logits = [
    training.apply({"params": adapters}, **inputs(training), rngs={"dropout": jax.random.key(seed)}) for seed in (0, 1)
  ]
  assert np.abs(np.asarray(logits[0] - logits[1])).max() > 1e-3  # a different mask per rng
  evaluation = lora.adapted_model(config, run.params, deterministic=True)
  config = config.copy_and_resolve_references()  # the modules hold the section itself
  config.lora.dropout = 0.0
  no_dropout = lora.adapted_model(config, run.params, deterministic=True)
  np.testing.assert_array_equal(
    evaluation.apply({"params": adapters}, **inputs(evaluation)),
    no_dropout.apply({"params": adapters}, **inputs(no_dropout)),
  )


def test_only_adapters_train_and_optimizer_state_is_theirs(lora_run):
  workdir, keep = lora_run
  params, opt_state = keep.state.params, keep.state.opt_state
  assert sorted(params) == sorted(
    f"decoder.layer_{i}.{module}.lora_{m}"
    for i in range(2)
    for module in ("self_attention.query", "self_attention.value", "self_attention.out", "mlp.down")
    for m in "ab"
  )
  adapter_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  # AdamW keeps two moments per adapter parameter, plus scalar counts: nothing of the base's size.
  moment_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(opt_state) if leaf.ndim)
  assert moment_bytes == 2 * adapter_bytes
  base_bytes = sum(
    leaf.nbytes
    for leaf in jax.tree.leaves(
      jaxlm.load(json.loads((workdir / "config.json").read_text())["lora"]["base_workdir"]).params
    )
  )
  assert adapter_bytes < base_bytes / 4
  # Every adapter moved (B from zero); the base stays the CLI run's checkpoint.
  for key in params:
    assert np.abs(params[key] - keep.initial[key]).max() > 0, key


def test_adapters_save_and_load_on_their_own(lora_run, base_run):
  workdir, keep = lora_run
  saved = json.loads((workdir / "config.json").read_text())["lora"]
  assert saved["base_workdir"] == str(base_run.absolute()) and saved["base_step"] == 6
  assert saved["base_checksum"] == lora.base_checksum(base_run, 6) != ""
  config = loader.load_config(workdir)
  mesh = loader.single_device_mesh()
  base = lora.base_params(config, mesh)
  module = lora.adapted_model(config, base)
  adapters, step = loader.restore_params(workdir, config, loader.param_shardings(config, mesh, module), None, module)
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(adapters), keep.state.params)
  np.testing.assert_array_equal(
    base["embedder"]["token"]["embedding"], jaxlm.load(base_run).params["embedder"]["token"]["embedding"]
  )


def test_a_lora_run_resumes_on_its_recorded_base(text_corpus, lora_run, base_run, tmp_path):
  workdir = tmp_path / "resumed"
  shutil.copytree(lora_run[0], workdir)
  config = lora_config(text_corpus, base_run)
  config.train.num_steps = 7
  keep = KeepState()
  jaxlm.train(config, workdir, callbacks=[keep])
  jax.tree.map(np.testing.assert_array_equal, keep.initial, lora_run[1].state.params)  # restored at step 6
  assert int(keep.state.step) == 7
  assert json.loads((workdir / "config.json").read_text())["lora"]["base_step"] == 6


def test_load_gives_every_command_the_merged_weights(text_corpus, lora_run, base_run):
  workdir, keep = lora_run
  run = jaxlm.load(workdir)
  assert run.step == 6 and run.config.lora.rank == 0 and run.config.model == jaxlm.load(base_run).config.model
  base = jaxlm.load(base_run).params
  module = lora.adapted_model(lora.resolve_base(lora_config(text_corpus, base_run)), base, deterministic=True)
  expected = lora.merge(base, keep.state.params, dict(module.targets), 8.0 / 4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), run.params, expected)
  assert not np.allclose(
    run.params["decoder"]["layer_0"]["mlp"]["down"]["kernel"], base["decoder"]["layer_0"]["mlp"]["down"]["kernel"]
  )


def test_bad_lora_settings_are_one_line(text_corpus, base_run, tmp_path):
  config = lora_config(text_corpus, base_run)
  config.lora.base_workdir = ""
  with pytest.raises(config_lib.ConfigError, match="--config.lora.base_workdir=RUN"):
    jaxlm.train(config, tmp_path / "a")
  config = lora_config(text_corpus, base_run)
  config.lora.targets = "query,qkv"
  with pytest.raises(config_lib.ConfigError, match="qkv names no projection.*choose from down, key, out"):
    jaxlm.train(config, tmp_path / "b")
  assert not (tmp_path / "b" / "checkpoints").exists()
  config = lora_config(text_corpus, tmp_path)
  with pytest.raises(config_lib.ConfigError, match="lora.base_workdir: .*config.json not found"):
    jaxlm.train(config, tmp_path / "c")


@pytest.mark.slow
def test_cli_lora_run_then_generate_and_convert_to_hf(text_corpus, base_run, tmp_path):
  workdir = tmp_path / "cli_lora"
  result = run_cli(
    [
      "train",
      "--config",
      TINY,
      "--workdir",
      str(workdir),
      "--config.data.source=files",
      f"--config.data.paths={text_corpus}/*.txt",
      "--config.data.val_fraction=0.2",
      "--config.train.num_steps=2",
      "--config.train.eval_every=2",
      "--config.train.eval_batches=1",
      "--config.lora.rank=2",
      f"--config.lora.base_workdir={base_run}",
    ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # The adapters alone: rank 2 on query and value (32 -> 4 x 8) of 2 layers, 2 * 2 * (32 * 2 + 2 * 32).
  assert "model: 512 parameters" in result.stderr
  # The commands that read the LoRA run, in this process (the train above checked the CLI's own process).
  assert main.main(["generate", "--workdir", str(workdir), "--prompt", "def ", "--max-tokens", "4"]) == 0
  # convert --to-hf writes the merged weights: query (in c_attn) moved, the MLP (c_fc) is the base's.
  from safetensors.numpy import load_file

  exported = {}
  for name, run in (("base", base_run), ("lora", workdir)):
    assert main.main(["convert", "--to-hf", str(run), "--out", str(tmp_path / name)]) == 0
    exported[name] = load_file(str(tmp_path / name / "model.safetensors"))
  attention = next(k for k in exported["base"] if k.endswith("0.attn.c_attn.weight"))
  mlp = next(k for k in exported["base"] if k.endswith("0.mlp.c_fc.weight"))
  assert not np.allclose(exported["lora"][attention], exported["base"][attention])
  np.testing.assert_array_equal(exported["lora"][mlp], exported["base"][mlp])


def test_a_base_replaced_by_another_run_of_the_same_shapes_is_refused(text_corpus, lora_run, base_run, tmp_path, capfd):
  """`lora_run`'s adapters over a copy of their base, which is then replaced by another run's step of the same
  model: every reader of the LoRA run names the base and what changed, instead of merging into it."""
  base = tmp_path / "base"
  shutil.copytree(base_run, base)
  workdir = tmp_path / "adapter"
  shutil.copytree(lora_run[0], workdir)
  saved = json.loads((workdir / "config.json").read_text())
  saved["lora"]["base_workdir"] = str(base)
  (workdir / "config.json").write_text(json.dumps(saved))
  lora.check_base(loader.load_config(workdir))  # the copy holds the weights it recorded

  base_config = loader.load_config(base)
  params = nn.meta.unbox(model_lib.build(base_config.model).init(jax.random.key(1), jnp.ones((1, 8), jnp.int32)))
  shutil.rmtree(base / "checkpoints")
  run_dir.write_checkpoint(base, 6, params, base_config, keep=3)  # same folder, shapes and step
  with pytest.raises(config_lib.ConfigError, match=f"lora.base_workdir: {base} step 6 is not the base .*changed"):
    jaxlm.load(workdir)
  result = run_in_process(["eval", "--workdir", str(workdir)], capfd)
  assert result.returncode == 2 and str(base) in error_line(result)
  config = lora_config(text_corpus, base)
  config.train.num_steps = 7
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(config_lib.ConfigError, match="is not the base these adapters were trained over"):
    jaxlm.train(config, workdir)  # resuming over the replaced base
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps  # nothing trained or saved

  # A recorded step that is gone is named; a LoRA run saved before the record existed loads as it did (unchecked).
  saved["lora"]["base_step"] = 5
  (workdir / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match=f"{base} has no checkpoint step 5, .*its steps: 6"):
    jaxlm.load(workdir)
  saved["lora"].pop("base_checksum")
  saved["lora"]["base_step"] = 6
  (workdir / "config.json").write_text(json.dumps(saved))
  assert jaxlm.load(workdir).step == 6


def test_mfu_counts_no_weight_gradient_for_the_frozen_base(lora_run, text_corpus, base_run):
  from jaxlm.training import flops

  workdir, _ = lora_run
  config = lora_config(text_corpus, base_run)
  rows = [row for row in map(json.loads, (workdir / "metrics.jsonl").open()) if "mfu" in row]
  assert rows
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  for row in rows:
    # The FLOPs behind the MFU are the LoRA count (frozen weights: forward and input gradient only), below a
    # full fine-tune's, over the cached nominal peak: under 100%.
    counted = row["mfu"] * row["peak_flops"] * row["step_time_s"] / tokens_per_step
    assert counted == pytest.approx(flops.training_flops_per_token(config), rel=1e-6)
    assert counted < flops.flops_per_token(config.model, config.data.seq_len) and row["mfu"] < 1
