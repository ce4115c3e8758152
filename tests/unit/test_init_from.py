"""train.init_from (jaxlm/training/init_from.py): a new run from another run's parameters, through the CLI and Python."""

import hashlib
import json
import math
import shutil

import jax
import numpy as np
import pytest
from support import (
  CHATML,
  CONVERSATIONS,
  REPO,
  classify_config,
  corrupt,
  hf_model,
  save_tokenizer,
  use_tiny_task,
  write_jsonl,
)

import jaxlm
from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.data import hf_tokenizer
from jaxlm.models import transformer as model_lib
from jaxlm.training import init_from
from jaxlm.training.init_from import initial_state

TINY = str(REPO / "configs" / "tiny.py")
SHORT = [
  "--config.train.num_steps=2",
  "--config.train.checkpoint_every=2",
  "--config.train.eval_every=2",
  "--config.train.eval_batches=1",
  "--config.train.log_every=1",
]


def files_args(text_corpus):
  return ["--config.data.source=files", f"--config.data.paths={text_corpus}/*.txt", "--config.data.val_fraction=0.2"]


def digest(folder):
  """{relative path: sha256} of every file under `folder`."""
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys, code, *fragments):
  """Asserts exit 2 with exactly one 'jaxlm: error:' line holding every fragment, and no traceback."""
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("jaxlm: error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


class KeepStart(jaxlm.Callback):
  """Keeps the parameters and the step the loop starts from."""

  def on_start(self, trainer, step):
    self.step, self.params = step, jax.device_get(trainer.state.params)


def named(tree):
  return {
    "/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def base(text_corpus, tmp_path_factory):
  """A 12-step decoder run of configs/tiny.py, trained by the CLI at a high learning rate (far below ln 260)."""
  workdir = tmp_path_factory.mktemp("base")
  assert (
    main.main(
      [
        "train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        *files_args(text_corpus),
        "--config.train.num_steps=12",
        "--config.train.checkpoint_every=12",
        "--config.train.eval_every=12",
        "--config.train.eval_batches=1",
        "--config.train.log_every=1",
        "--config.optim.learning_rate=1e-2",
        "--config.optim.warmup_steps=2",
      ]
    )
    == 0
  )
  return workdir


def test_cli_starts_from_the_base_params_and_a_restart_reads_only_its_own(
  base, text_corpus, tmp_path, monkeypatch, capsys
):
  copy = shutil.copytree(base, tmp_path / "base")  # deleted below, before the restart
  before = digest(copy)
  starts = []

  def spy(*args, **kwargs):  # the state the loop starts from, as the trainer builds it
    state = initial_state(*args, **kwargs)
    starts.append(jax.device_get(state.params))
    return state

  monkeypatch.setattr(init_from, "initial_state", spy)
  workdir = tmp_path / "fine_tuned"
  train = [
    "train",
    "--config",
    TINY,
    "--workdir",
    str(workdir),
    *files_args(text_corpus),
    *SHORT,
    f"--config.train.init_from={copy}",
    "--config.model.remat_policy=full",
    "--config.optim.learning_rate=1e-4",
  ]  # configs/tiny.py has the base's model; a runtime key differs
  assert main.main(train) == 0
  assert f"init_from {copy} step 12: 36 arrays copied" in capsys.readouterr().err
  assert digest(copy) == before
  for (name, got), want in zip(named(starts[0]).items(), named(loader.load(copy).params).values()):
    np.testing.assert_array_equal(got, want, err_msg=name)
  first = metrics(workdir)[0]
  base_final = [row["val_loss"] for row in metrics(copy) if "val_loss" in row][-1]
  assert first["step"] == 1 and base_final < math.log(260) - 1.5
  # a fresh model scores about ln 260 on its first batch
  assert abs(first["loss"] - base_final) < 0.3 * (math.log(260) - base_final), (first["loss"], base_final)
  saved = loader.load_config(workdir)
  assert (saved.train.init_from, saved.train.init_from_step, saved.model.remat_policy) == (str(copy), 12, "full")

  shutil.rmtree(copy)  # a restart reads the run's own record and checkpoints, not the base
  assert main.main([*train, "--config.train.num_steps=3"]) == 0
  assert "resumed from step 2" in capsys.readouterr().err and len(starts) == 1
  assert loader.load(workdir).step == 3 and loader.load_config(workdir).train.init_from == str(copy)


@pytest.fixture(scope="module")
def encoder_base(tmp_path_factory):
  """A BERT-style MLM run with the classifier tests' encoder shape, at its random initialization (step 0)."""
  config = classify_config("encoder_classifier")
  config.model.family, config.model.num_classes = "encoder", 0
  module = model_lib.build(config.model)
  batch = model_lib.example_batch(config.model, (1, 8))
  params = module.init(jax.random.key(1), **model_lib.model_inputs(config.model, batch))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("encoder"))


@pytest.mark.parametrize(
  "family, base_fixture, dropped", [("encoder_classifier", "encoder_base", 5), ("decoder_classifier", "base", 0)]
)
def test_a_classifier_takes_the_body_and_starts_its_head(
  family, base_fixture, dropped, request, tmp_path, monkeypatch, capsys
):
  use_tiny_task(monkeypatch)
  base_dir = request.getfixturevalue(base_fixture)
  capsys.readouterr()
  config = classify_config(family)
  config.train.init_from, config.train.num_steps = str(base_dir), 1
  start = KeepStart()
  jaxlm.train(config, tmp_path / "run", callbacks=[start])
  base_params = named(loader.load(base_dir).params)
  params = named(start.params)
  head = [name for name in params if name.startswith("head/")]
  assert len(head) == 4 and not any(name in base_params for name in head)
  for name, value in params.items():
    if name not in head:
      np.testing.assert_array_equal(value, base_params[name], err_msg=name)
  assert len(base_params) - (len(params) - len(head)) == dropped  # BERT's MLM head
  line = f"{len(params) - 4} arrays copied, 4 new (head)" + (f", {dropped} dropped (mlm_head)" if dropped else "")
  assert line in capsys.readouterr().err


def test_bad_bases_are_one_line(base, text_corpus, tmp_path, capsys):
  def train(*args):
    return main.main(
      ["train", "--config", TINY, "--workdir", str(tmp_path / "run"), *files_args(text_corpus), *SHORT, *args]
    )

  one_error_line(
    capsys, train(f"--config.train.init_from={tmp_path / 'missing'}"), "train.init_from:", "config.json not found"
  )
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(base / name, empty / name)
  one_error_line(capsys, train(f"--config.train.init_from={empty}"), "no complete checkpoint")
  one_error_line(
    capsys, train(f"--config.train.init_from={base}", "--config.train.init_from_step=5"), "train.init_from_step=5", "12"
  )
  one_error_line(
    capsys,
    train(f"--config.train.init_from={base}", "--config.model.d_model=64"),
    "config key 'model.d_model' is 64",
    "has 32",
  )
  one_error_line(
    capsys,
    train(f"--config.train.init_from={base}", "--config.lora.rank=4", f"--config.lora.base_workdir={base}"),
    "train.init_from and lora.rank",
  )
  one_error_line(
    capsys,
    train(f"--config.train.init_from={base}", "--config.model.family=encoder"),
    "does not fit model.family 'encoder'",
    "'encoder/layer_0/",
  )
  damaged = shutil.copytree(base, tmp_path / "damaged")
  corrupt(damaged / "checkpoints" / "12", "flip_one_bit_per_file")
  one_error_line(capsys, train(f"--config.train.init_from={damaged}"), "step 12", "damaged")
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_fine_tune_a_converted_hf_model_from_the_command_line(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  folder, converted = tmp_path / "hf", tmp_path / "gpt2"
  save_tokenizer(folder)
  hf_model("gpt2").save_pretrained(folder)
  assert main.main(["convert", "--from-hf", str(folder), "--workdir", str(converted)]) == 0
  data = write_jsonl(
    tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, {"prompt": "def add(x", "completion": ", y):"}] * 8
  )
  workdir = tmp_path / "chat"
  assert (
    main.main(
      [
        "train",
        "--config",
        TINY,
        "--workdir",
        str(workdir),
        *SHORT,
        f"--config.train.init_from={converted}",
        "--config.data.source=jsonl",
        f"--config.data.paths={data}",
        f"--config.data.validation_paths={data}",
      ]
    )
    == 0
  )
  assert "init_from: the model is" in capsys.readouterr().err  # configs/tiny.py's vocab_size is not GPT-2's
  run = loader.load(workdir)
  assert isinstance(run.tokenizer, hf_tokenizer.HuggingFaceTokenizer) and run.tokenizer.chat_template == CHATML
  assert (workdir / hf_tokenizer.FOLDER / "tokenizer.json").is_file() and run.config.model.vocab_size == 320
  assert main.main(["generate", "--workdir", str(workdir), "--prompt", "def add(x", "--max-tokens", "4"]) == 0
