"""Hugging Face tokenizers in jaxlm: a BPE tokenizer trained here offline, saved beside random HF models, converted,
and generation through jaxlm compared with transformers' `generate` + `decode`."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")  # support.save_tokenizer trains one

from support import CHATML, CONVERSATIONS, SPECIALS, TEXTS, VOCAB, hf_model, save_tokenizer, write_jsonl

from jaxlm import loader
from jaxlm.cli import main
from jaxlm.data import hf_tokenizer
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.inference import decode


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def converted(request, tmp_path_factory):
  """(style, HF folder, transformers tokenizer, HF model, jaxlm run) for a converted model with its tokenizer."""
  style = request.param
  folder = tmp_path_factory.mktemp(f"hf_{style}")
  tok = save_tokenizer(folder, style)
  model = hf_model(style)
  model.save_pretrained(folder)
  run = folder.parent / f"run_{style}"
  assert main.main(["convert", "--from-hf", str(folder), "--workdir", str(run)]) == 0
  return style, folder, tok, model, run


def test_tokenizer_matches_transformers(converted):
  style, folder, tok, _, run = converted
  ours = tokenizer_lib.load(run)
  assert isinstance(ours, hf_tokenizer.HuggingFaceTokenizer)
  assert (ours.bos_id, ours.eos_id) == (tok.bos_token_id, tok.eos_token_id)
  assert ours.bos_id != ours.eos_id if style == "llama" else ours.bos_id == ours.eos_id
  assert ours.chat_template == CHATML and ours.special_tokens["eos_token"] == tok.eos_token
  for text in TEXTS + ["unseen w\u00f6rds \U0001f600 and <|im_end|> inside"]:
    ids = ours.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == tok.decode(ids.tolist(), skip_special_tokens=True)
    # Byte-level BPE: every byte of the text is counted once, special tokens count none.
    plain = text
    for special in SPECIALS:
      plain = plain.replace(special, "")
    expected = len(plain.encode("utf-8"))
    assert int(ours.byte_lengths()[ids].sum()) == expected
  assert ours.decode([ours.eos_id, VOCAB - 1, 10_000]) == ""  # specials and ids past the tokenizer drop out


def test_generation_matches_transformers(converted, capsys):
  """Greedy generation through jaxlm is transformers' `generate` + `decode` on the same prompt ids: stopping at
  EOS (decode.Generator), and for 20 tokens regardless of EOS (`jaxlm generate --ignore-eos`)."""
  style, _, tok, model, run = converted
  prompt = "def add(x"
  ours = tokenizer_lib.load(run)
  loaded = loader.load(run)
  ids = decode.adapter_for(loaded.config.model, ours.bos_id).prompt_ids(ours, prompt)
  generator = decode.Generator(loaded.config.model, loaded.params, start_id=ours.bos_id)
  # An explicit attention mask: HF would otherwise mask the leading EOS wherever it equals the pad id.
  inputs = {
    "input_ids": torch.tensor([ids]),
    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    "max_new_tokens": 20,
    "do_sample": False,
    "pad_token_id": tok.eos_token_id,
  }
  with torch.no_grad():
    stopped = model.generate(**inputs, eos_token_id=tok.eos_token_id)[0, len(ids) :].tolist()
    full = model.generate(**inputs)[0, len(ids) :].tolist()  # the model config names no EOS
  if tok.eos_token_id in stopped:
    stopped = stopped[: stopped.index(tok.eos_token_id)]
  assert generator.generate([ids], 20, stop_ids=[ours.eos_id])[0] == stopped
  assert len(full) == 20 and generator.generate([ids], 20)[0] == full
  capsys.readouterr()
  assert (
    main.main(
      ["generate", "--workdir", str(run), "--prompt", prompt, "--max-tokens", "20", "--ignore-eos", "--no-echo"]
    )
    == 0
  )  # the generated text alone, as transformers decodes it
  text = capsys.readouterr().out
  assert text == tok.decode(full, skip_special_tokens=True) + "\n"
  assert len(text.strip()) > 5


def test_to_hf_writes_the_tokenizer_back(converted, tmp_path):
  style, folder, tok, _, run = converted
  assert main.main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "back")]) == 0
  back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
  for text in TEXTS:
    assert back.encode(text) == tok.encode(text)
  assert back.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == tok.apply_chat_template(
    [{"role": "user", "content": "hi"}], tokenize=False
  )
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
  assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == tok.eos_token_id


def test_bad_tokenizer_folders_are_one_line(tmp_path, capsys):
  (tmp_path / "tok").mkdir()
  with pytest.raises(hf_tokenizer.HuggingFaceTokenizerError, match="tokenizer.json not found"):
    hf_tokenizer.HuggingFaceTokenizer(tmp_path / "tok")
  (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
  with pytest.raises(hf_tokenizer.HuggingFaceTokenizerError, match="cannot be read"):
    hf_tokenizer.HuggingFaceTokenizer(tmp_path / "tok")
  save_tokenizer(tmp_path / "noeos")
  config_path = tmp_path / "noeos" / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["eos_token"] = "<|missing|>"
  config_path.write_text(json.dumps(config))
  with pytest.raises(hf_tokenizer.HuggingFaceTokenizerError, match="no eos_token"):
    hf_tokenizer.HuggingFaceTokenizer(tmp_path / "noeos")
  # The CLI: a run config naming a folder without tokenizer.json is refused before anything runs.
  code = main.main(
    [
      "train",
      "--config",
      "configs/tiny.py",
      "--workdir",
      str(tmp_path / "run"),
      "--config.data.tokenizer=huggingface",
      f"--config.data.tokenizer_path={tmp_path / 'tok2'}",
    ]
  )
  assert code == 2 and "holds no tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tune_a_converted_model_on_chat_data(converted, tmp_path):
  """The converted run trains on chat records with its own tokenizer and template (jaxlm.train on its workdir)."""
  import shutil

  from jaxlm.training import trainer

  style, _, tok, _, run = converted
  if style != "gpt2":
    pytest.skip("one architecture is enough for the training path")
  workdir = shutil.copytree(run, tmp_path / "run")
  records = [{"messages": CONVERSATIONS[0]}, {"prompt": "def add(x", "completion": ", y):"}] * 8
  config = loader.load_config(workdir)
  assert config.data.tokenizer == "huggingface"  # convert recorded the run's own tokenizer folder
  config.data.tokenizer_path = str(workdir / hf_tokenizer.FOLDER)
  config.data.source = "jsonl"
  config.data.paths = str(write_jsonl(tmp_path / "train.jsonl", records))
  config.data.validation_paths = config.data.paths
  config.data.seq_len = 64
  for key, value in dict(
    num_steps=2, eval_every=2, checkpoint_every=2, eval_batches=1, global_batch_size=8, log_every=1
  ).items():
    config.train[key] = value
  config.eval.batch_size = 8
  before = loader.load(workdir).params
  trainer.train(config, workdir)
  after = loader.load(workdir)
  assert after.step == 2 and isinstance(after.tokenizer, hf_tokenizer.HuggingFaceTokenizer)
  assert after.tokenizer.chat_template == CHATML
  moved = [
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before))
  ]
  assert max(moved) > 0


@pytest.mark.slow
def test_export_takes_and_returns_text_with_the_hf_tokenizer(converted, tmp_path):
  """`jaxlm export` carries the Hugging Face tokenizer: the artifact's text equals transformers' decode of the
  same greedy ids."""
  from jaxlm.inference import export

  style, _, tok, _, run = converted
  if style != "gpt2":
    pytest.skip("one architecture is enough for the export path")
  loaded = loader.load(run)
  artifact = export.load(export.export_run(loaded, tmp_path / "export", 1, 16))
  assert isinstance(artifact.tokenizer, hf_tokenizer.HuggingFaceTokenizer)
  ids = decode.adapter_for(loaded.config.model, loaded.tokenizer.bos_id).prompt_ids(loaded.tokenizer, "def add(x")
  expected = decode.Generator(loaded.config.model, loaded.params).generate([ids], 10, stop_ids=[tok.eos_token_id])
  assert artifact.generate("def add(x", 10) == tok.decode(expected[0], skip_special_tokens=True)
