"""Faults of fine-tuning data and bases (issue 21), through the `jaxlm` command in this process.

Each case ends CLEAN: exactly one `jaxlm: error:` line naming the file (and the record, key or field) with exit
status 2 and no traceback, before anything is trained or written to checkpoints. The LoRA base's identity is
tested in tests/integration/test_lora.py, the server's slow and broken clients in tests/unit/test_serve.py.
"""

import json
import shutil

import pytest
from support import TINY, error_line, run_in_process, write_jsonl

TRAIN = ["train", "--config", TINY, "--config.train.num_steps=2"]


def train(workdir, *extra):
  return [*TRAIN, "--workdir", str(workdir), *extra]


def test_sft_whose_every_answer_is_cut_is_refused(tmp_path, capfd):
  data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "completion": "yes"}] * 6)
  result = run_in_process(train(tmp_path / "run", "--config.data.source=jsonl", f"--config.data.paths={data}"), capfd)
  line = error_line(result)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "keep no answer token within data.seq_len=32" in line and str(data) in line, line
  assert "raise data.seq_len to at least 41" in line, line
  assert not (tmp_path / "run" / "checkpoints").exists()


def _squad(path, start_shift=0, answers=None):
  context = "The quick brown fox jumps over the lazy dog"
  qas = [{"id": f"q{i}", "question": "Who?", "answers": [{"text": "brown fox", "answer_start": 10}]} for i in range(3)]
  qas[2]["answers"][0]["answer_start"] += start_shift
  if answers is not None:
    qas[2]["answers"] = answers
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
  return path


@pytest.mark.parametrize(
  "case, message",
  [
    ({"start_shift": 7}, "answer 'brown fox' is not at answer_start=17"),
    ({"start_shift": 100}, "answer 'brown fox' is not at answer_start=110 of its 43-character context"),
    ({"answers": []}, "has no answers"),
  ],
)
def test_squad_answers_off_their_context_are_refused(tmp_path, capfd, case, message):
  data = _squad(tmp_path / "train.json", **case)
  squad = [
    "--config.model.family=encoder_qa",
    "--config.model.num_token_types=2",
    "--config.model.norm_position=post",
    "--config.data.source=squad",
    f"--config.data.paths={data}",
    f"--config.data.validation_paths={data}",
  ]
  result = run_in_process(train(tmp_path / "run", *squad), capfd)
  line = error_line(result)
  assert result.returncode == 2 and f"{data}: question 'q2'" in line and message in line, line


def test_a_chat_template_that_raises_is_one_line_naming_it(tmp_path, capfd):
  pytest.importorskip("transformers")
  from support import VOCAB, save_tokenizer

  folder = tmp_path / "tokenizer"
  save_tokenizer(folder)
  (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{{ 1 // 0 }}{% endfor %}")
  data = write_jsonl(
    tmp_path / "chat.jsonl",
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4,
  )
  result = run_in_process(
    train(
      tmp_path / "run",
      "--config.data.source=jsonl",
      f"--config.data.paths={data}",
      "--config.data.tokenizer=huggingface",
      f"--config.data.tokenizer_path={folder}",
      f"--config.model.vocab_size={VOCAB}",
    ),
    capfd,
  )
  line = error_line(result)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"{data}, line 1: the chat template in {folder / 'chat_template.jinja'} failed: ZeroDivisionError" in line


@pytest.mark.parametrize("garbled", ["config.json", "tokenizer.json"])
def test_a_garbled_file_of_an_init_from_base_is_one_line_naming_it(cli_run, tmp_path, capfd, garbled):
  base = tmp_path / "base"
  shutil.copytree(cli_run[0], base)
  text = (base / garbled).read_bytes()
  (base / garbled).write_bytes(text[: len(text) // 2] + b"\xff\x00" + text[len(text) // 2 + 2 :])
  result = run_in_process(train(tmp_path / "run", f"--config.train.init_from={base}"), capfd)
  line = error_line(result)
  assert result.returncode == 2 and f"{base / garbled}" in line, line
  if garbled == "config.json":  # every reader of that run names it too
    for args in (
      ["eval", "--workdir", str(base)],
      train(tmp_path / "lora", "--config.lora.rank=2", f"--config.lora.base_workdir={base}"),
    ):
      result = run_in_process(args, capfd)
      assert result.returncode == 2 and f"{base / garbled}" in error_line(result), result.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()
