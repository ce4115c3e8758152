"""Instruction and chat data: chat templates as transformers renders them, loss weights on answers only, packing,
exact resume, and one-line errors for bad records."""

import json

import numpy as np
import pytest
from support import CHATML, CONVERSATIONS, RECORDS, save_tokenizer, tiny_config, write_jsonl

from jaxlm.cli import main
from jaxlm.data import chat_template, instruct
from jaxlm.data import pipeline as data_lib
from jaxlm.data import tokenizer as tokenizer_lib

# A LLaMA-2 style template: bos_token, raise_exception, loop variables and whitespace control.
LLAMA2 = (
  "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
  "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
  "{% for message in messages %}"
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
  "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
  "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
  "{{ message['content'] | trim }} [/INST]"
  "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"
)
TOJSON = (
  "{% for message in messages %}{{ message | tojson }}\n{% endfor %}"
  '{% if add_generation_prompt %}{"role": "assistant", "content": "{% endif %}'
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A saved byte-level BPE tokenizer with the ChatML template (see support.save_tokenizer)."""
  pytest.importorskip("transformers")
  folder = tmp_path_factory.mktemp("hf_tok")
  return folder, save_tokenizer(folder, "llama")


@pytest.mark.parametrize("name", ["chatml", "llama2", "tojson", "default"])
def test_rendering_equals_transformers_apply_chat_template(hf_folder, name):
  from jaxlm.data import hf_tokenizer

  source = {"chatml": CHATML, "llama2": LLAMA2, "tojson": TOJSON, "default": chat_template.DEFAULT_TEMPLATE}[name]
  folder, hf_tok = hf_folder
  hf_tok.chat_template = source
  template = chat_template.ChatTemplate(source, hf_tokenizer.HuggingFaceTokenizer(folder).special_tokens)
  for messages in CONVERSATIONS:
    for generation_prompt in (False, True):
      if name == "llama2" and (messages[-1]["role"] == "user") != generation_prompt:
        continue
      expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
      assert template.render(messages, generation_prompt) == expected
  # raise_exception inside the template: one clear error, as transformers raises one.
  if name == "llama2":
    with pytest.raises(chat_template.ChatTemplateError, match="must alternate"):
      template.render([{"role": "assistant", "content": "x"}])


def test_templates_are_sandboxed():
  template = chat_template.ChatTemplate("{{ messages.__class__.__mro__ }}")
  with pytest.raises(chat_template.ChatTemplateError):
    template.render([{"role": "user", "content": "x"}])
  with pytest.raises(chat_template.ChatTemplateError, match="syntax error at line 1"):
    chat_template.ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize(
  "source, error",
  [
    ("{{ 1 // 0 }}", "failed: ZeroDivisionError: integer division or modulo by zero"),
    ("{{ messages[0]['content'] + 1 }}", "failed: TypeError: can only concatenate str"),
    ("{{ raise_exception('roles must alternate') }}", "refused these messages: roles must alternate"),
  ],
)
def test_a_template_that_raises_is_one_error_naming_it(source, error):
  template = chat_template.ChatTemplate(source, name="the chat template in T/chat_template.jinja")
  assert template.turn_end == ""  # its probe conversation failed too: no marker, and no traceback
  with pytest.raises(chat_template.ChatTemplateError, match="in T/chat_template.jinja " + error) as caught:
    template.render([{"role": "user", "content": "x"}])
  assert "\n" not in str(caught.value)


def test_segments_mark_exactly_the_assistant_turns(hf_folder):
  for source, turn_end in ((CHATML, "<|im_end|>"), (chat_template.DEFAULT_TEMPLATE, "<|end|>"), (LLAMA2, "</s>")):
    template = chat_template.ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
    assert template.turn_end == turn_end
    messages = CONVERSATIONS[1][1:] if source == LLAMA2 else CONVERSATIONS[1]
    pieces = template.segments(messages)
    assert "".join(text for text, _ in pieces) == template.render(messages)
    answers = [text for text, is_answer in pieces if is_answer]
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(answers) == len(contents)
    for answer, content in zip(answers, contents):
      assert content in answer and turn_end in answer and "user" not in answer


def jsonl_config(tmp_path, records=RECORDS, **data):
  c = tiny_config()
  c.data.source = "jsonl"
  c.data.paths = str(write_jsonl(tmp_path / "train.jsonl", records))
  c.data.validation_paths = str(write_jsonl(tmp_path / "valid.jsonl", records[:4]))
  c.data.seq_len = 192
  c.model.max_len = 192
  for key, value in data.items():
    c.data[key] = value
  return c


def answers_of(rows, tokenizer):
  """The weighted target tokens of every row, decoded per segment, and the rows themselves."""
  answers = []
  for i in range(len(rows)):
    row = rows[i]
    for segment in range(1, int(row["segment_ids"].max()) + 1):
      in_segment = row["segment_ids"] == segment
      weighted = row["targets"][in_segment & (row["weights"] > 0)]
      assert weighted[-1] == tokenizer.eos_id  # the answer ends with EOS, which is trained on
      answers.append(tokenizer.decode(weighted))
  return answers


def test_weights_are_on_answers_only_and_packing_keeps_them(tmp_path):
  config = jsonl_config(tmp_path)
  tokenizer = tokenizer_lib.ByteTokenizer()
  rows = data_lib.decoder_rows(config, tokenizer, "train")
  template = chat_template.for_tokenizer(tokenizer)
  expected = []
  for record in RECORDS:
    if "messages" in record:
      expected.append("".join(t for t, is_answer in template.segments(record["messages"]) if is_answer))
    else:
      expected.append(record["completion"])
  assert answers_of(rows, tokenizer) == expected
  assert len(rows) < len(RECORDS)  # several examples share a row
  for i in range(len(rows)):
    row = rows[i]
    segments, positions = row["segment_ids"], row["positions"]
    assert row["inputs"].shape == (192,) and set(row) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    # Segment ids count up from 1 in order; positions restart at 0 in each; padding is segment 0 and weight 0.
    real = segments > 0
    assert np.all(np.diff(segments[real]) >= 0) and segments[real][0] == 1 and not real[real.sum() :].any()
    starts = np.flatnonzero(np.diff(segments, prepend=0) != 0)
    assert np.all(positions[starts[segments[starts] > 0]] == 0)
    assert not row["weights"][~real].any()
    # Inputs are the targets shifted by one inside each segment: every example is whole and in order.
    same = (segments[1:] == segments[:-1]) & real[1:]
    np.testing.assert_array_equal(row["inputs"][1:][same], row["targets"][:-1][same])
  # The prompt starts after the decoder's prefix (EOS), as `jaxlm generate` and `jaxlm serve` feed it.
  assert rows[0]["inputs"][0] == tokenizer.eos_id and tokenizer.decode(rows[0]["inputs"][1:4]) == "Q0:"


def test_hf_chat_special_tokens_become_their_ids(tmp_path, hf_folder):
  folder, _ = hf_folder
  config = jsonl_config(
    tmp_path, records=[{"messages": CONVERSATIONS[1]}] * 4, tokenizer="huggingface", tokenizer_path=str(folder)
  )
  tokenizer = tokenizer_lib.from_config(config.data)
  rows = instruct.rows(config, tokenizer, "train")
  end_id = tokenizer.backend.token_to_id("<|im_end|>")
  row = rows[0]
  first = row["segment_ids"] == 1
  # Two assistant turns, each closed by <|im_end|>, which carries weight (the model learns to stop its turn).
  assert int(np.sum((row["targets"] == end_id) & first & (row["weights"] > 0))) == 2
  assert int(np.sum((row["targets"] == end_id) & first)) == 5  # one per message
  assert answers_of(rows, tokenizer)[0] == "Hello.\nHow can I help?\n[1, 3]\n"


def test_long_examples_are_cut_with_a_warning(tmp_path):
  config = jsonl_config(tmp_path, records=[{"prompt": "x" * 300, "completion": "y"}] * 2 + RECORDS[:2])
  with pytest.warns(UserWarning, match="2 of 4 train examples are longer than data.seq_len=192"):
    rows = instruct.rows(config, tokenizer_lib.ByteTokenizer(), "train")
  assert rows.truncated == 2 and len(rows) == 3
  assert not rows[0]["weights"].any() and rows[0]["segment_ids"].min() == 1  # only prompt fits: no answer


def test_no_answer_token_left_is_an_error_and_mostly_none_a_warning(tmp_path):
  long = {"prompt": "x" * 300, "completion": "y"}  # 302 tokens with the prefix: the answer starts at token 301
  config = jsonl_config(tmp_path, records=[long] * 3)
  with pytest.raises(instruct.RecordError) as error:
    instruct.rows(config, tokenizer_lib.ByteTokenizer(), "train")
  message = str(error.value)
  assert f"3 of 3 train examples in {tmp_path / 'train.jsonl'} keep no answer token within data.seq_len=192" in message
  assert "raise data.seq_len to at least 301" in message and "\n" not in message
  config = jsonl_config(tmp_path, records=[long] * 3 + RECORDS[:2])
  with pytest.warns(UserWarning, match="WARNING: 3 of 5 train examples .* keep no answer token") as caught:
    rows = instruct.rows(config, tokenizer_lib.ByteTokenizer(), "train")
  assert rows.answerless == 3 and len(caught) == 2  # beside the count of cut examples
  assert rows.answer_tokens() == sum(len(r["completion"]) + 1 for r in RECORDS[:2])


def test_batches_resume_exactly(tmp_path):
  config = jsonl_config(tmp_path)
  rows = data_lib.decoder_rows(config, tokenizer_lib.ByteTokenizer(), "train")
  full = list(data_lib.train_batches(rows, 2, seed=3, start_step=0, num_steps=8))
  for k in (3, 5):  # a second resume within the same run, across an epoch boundary
    resumed = list(data_lib.train_batches(rows, 2, seed=3, start_step=k, num_steps=8))
    assert len(resumed) == 8 - k
    for a, b in zip(full[k:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  assert any(np.any(b["weights"]) for b in full)


@pytest.mark.parametrize(
  "line, field",
  [
    ('{"prompt": "q"}', "field 'completion' must be a non-empty string"),
    ('{"prompt": "q", "completion": 3}', "field 'completion' must be a non-empty string"),
    ('{"prompt": 1, "completion": "a"}', "field 'prompt' must be a string"),
    ('{"text": "q"}', "field 'prompt' and 'completion' (or 'messages') missing; found text"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role must be one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "field 'messages' has no assistant message"),
    ('{"messages": [], "prompt": "x"}', "field 'messages' and 'prompt'/'completion' together"),
    ('{"prompt": "q", "completion": "a"', "not valid JSON"),
    ('["prompt", "completion"]', "a record must be a JSON object"),
  ],
)
def test_bad_records_are_one_line_naming_file_line_and_field(tmp_path, capsys, line, field):
  records = [json.dumps(RECORDS[0]), "", line]  # the bad record is on line 3 (line 2 is blank)
  config = jsonl_config(tmp_path, records=records)
  with pytest.raises(instruct.RecordError) as error:
    instruct.rows(config, tokenizer_lib.ByteTokenizer(), "train")
  assert str(error.value).startswith(f"{tmp_path / 'train.jsonl'}, line 3: ") and field in str(error.value)
  assert "\n" not in str(error.value)


def test_cli_errors(tmp_path, capsys):
  write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "q"}'])
  base = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.data.source=jsonl"]
  assert main.main(base + [f"--config.data.paths={tmp_path / 'bad.jsonl'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxlm: error: ") and "bad.jsonl, line 1: field 'completion'" in err and err.count("\n") == 1
  assert main.main(base) == 2
  assert "data.paths is empty but data.source='jsonl'" in capsys.readouterr().err
  assert main.main(base + [f"--config.data.paths={tmp_path / 'missing*.jsonl'}"]) == 2
  assert "no file matches" in capsys.readouterr().err


def test_without_validation_paths_lines_split_by_hash(tmp_path):
  """data.val_fraction of the lines (by their text) are validation, the rest train: disjoint, nothing lost."""
  records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)]
  config = jsonl_config(tmp_path, records=records, validation_paths="", val_fraction=0.2)
  splits = {
    split: [r.value["prompt"] for r in instruct.read_records(config.data, split)] for split in ("train", "validation")
  }
  assert not set(splits["train"]) & set(splits["validation"])
  assert sorted(splits["train"] + splits["validation"]) == sorted(r["prompt"] for r in records)
  assert 20 <= len(splits["validation"]) <= 60
