"""The real `openai` Python client against `jaxlm serve` (a subprocess) on a tiny run: every field it supports,
streamed and not, checked for effect (penalties, logit_bias, list and token-id prompts, chat logprobs, usage
in streams), the refusals (400 naming the field), and the serve log naming the run and step it loaded."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from support import REPO, files_config, free_port

from jaxlm import hf
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.models import transformer as model_lib

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # about 70 s on 2 loaded cores: a `jaxlm serve` process starts and compiles

PROMPT = "def parse(text):"


@pytest.fixture(scope="module")
def client(tmp_path_factory, text_corpus):
  """An OpenAI client on `jaxlm serve` of a run with random weights (4 decode slots); yields (client, stderr)."""
  config = files_config(text_corpus)
  params = model_lib.build(config.model).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  run = hf.write_run(config, params, tmp_path_factory.mktemp("served"))
  port = free_port()
  log = tmp_path_factory.mktemp("log") / "serve.log"
  with open(log, "w") as stderr:
    process = subprocess.Popen(
      [sys.executable, "-m", "jaxlm", "serve", "--workdir", str(run), "--port", str(port), "--max-batch", "4"],
      stdout=subprocess.DEVNULL,
      stderr=stderr,
      cwd=REPO,
    )
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
  try:
    deadline = time.time() + 180
    while True:
      try:
        client.models.list()
        break
      except openai.APIConnectionError:
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
    yield client, run.name, log
  finally:
    process.terminate()
    process.wait(30)


def _ids(logprobs_tokens: list[str]) -> list[int]:
  """Byte-tokenizer ids of `logprobs` token texts (a lone byte is 'bytes:\\xNN')."""
  offset = tokenizer_lib.ByteTokenizer.offset
  return [int(t[-2:], 16) + offset if t.startswith("bytes:") else t.encode()[0] + offset for t in logprobs_tokens]


def _complete(client, name, **fields):
  return client.completions.create(model=name, prompt=fields.pop("prompt", PROMPT), **fields)


def test_completions_with_every_supported_field(client):
  client, name, log = client
  neutral = dict(
    max_tokens=8,
    presence_penalty=0,
    frequency_penalty=0,
    logit_bias={},
    suffix="",
    best_of=1,
    extra_body={"response_format": {"type": "text"}},
  )
  plain = _complete(client, name, max_tokens=8, logprobs=1)
  greedy = _ids(plain.choices[0].logprobs.tokens)
  assert _complete(client, name, **neutral).choices[0].text == plain.choices[0].text
  assert _complete(client, name, extra_body={"max_completion_tokens": 8}).choices[0].text == plain.choices[0].text

  # logit_bias: -100 on the greedy first token changes it; +100 forces a token everywhere.
  banned = _complete(client, name, max_tokens=8, logprobs=1, logit_bias={str(greedy[0]): -100})
  assert _ids(banned.choices[0].logprobs.tokens)[0] != greedy[0]
  forced_id = tokenizer_lib.ByteTokenizer().encode("Z")[0]
  assert _complete(client, name, max_tokens=8, logit_bias={str(forced_id): 100}).choices[0].text == "Z" * 8
  # Penalties: the tokens already generated lose logit, so a penalized completion repeats less.
  assert len(set(greedy)) < len(greedy)  # the random model repeats itself
  for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
    penalized = _ids(_complete(client, name, max_tokens=8, logprobs=1, **penalty).choices[0].logprobs.tokens)
    assert len(set(penalized)) > len(set(greedy)), penalty

  # A list of prompts: n choices each, indexed prompt-major; token-id prompts are taken as they are.
  other = "import os"
  listed = _complete(client, name, prompt=[PROMPT, other], n=2, max_tokens=8)
  assert [c.index for c in listed.choices] == [0, 1, 2, 3]
  alone = _complete(client, name, prompt=other, max_tokens=8).choices[0].text
  assert [c.text for c in listed.choices] == [plain.choices[0].text] * 2 + [alone] * 2
  tok = tokenizer_lib.ByteTokenizer()
  ids = [tok.eos_id] + [int(i) for i in tok.encode(PROMPT)]
  assert _complete(client, name, prompt=ids, max_tokens=8).choices[0].text == plain.choices[0].text
  by_ids = _complete(client, name, prompt=[ids, ids[:5]], max_tokens=8)
  assert by_ids.choices[0].text == plain.choices[0].text and len(by_ids.choices) == 2
  assert by_ids.usage.prompt_tokens == len(ids) + 5

  # Streaming, with the usage in a last chunk of no choices.
  chunks = list(
    _complete(client, name, max_tokens=8, stream=True, stream_options={"include_usage": True}, presence_penalty=0)
  )
  assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
  assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens

  text = log.read_text()
  assert f"loaded run {name} " in text and "at step 0" in text, text


def test_chat_with_logprobs_usage_and_max_completion_tokens(client):
  client, name, _ = client
  messages = [{"role": "user", "content": "hello"}]
  answer = client.chat.completions.create(
    model=name,
    messages=messages,
    max_completion_tokens=6,
    logprobs=True,
    top_logprobs=3,
    presence_penalty=0,
    frequency_penalty=0,
    logit_bias={},
    response_format={"type": "text"},
  )
  choice = answer.choices[0]
  content = choice.logprobs.content
  assert answer.usage.completion_tokens <= 6 and len(content) >= 1
  assert "".join(bytes(entry.bytes).decode("utf-8", "replace") for entry in content).startswith(
    choice.message.content[:1]
  )
  for entry in content:  # greedy: each token is its step's most likely one
    assert len(entry.top_logprobs) == 3
    assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob

  chunks = list(
    client.chat.completions.create(
      model=name,
      messages=messages,
      max_completion_tokens=6,
      logprobs=True,
      top_logprobs=2,
      stream=True,
      stream_options={"include_usage": True},
    )
  )
  streamed = [c for c in chunks if c.choices]
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
  tokens = [entry.token for c in streamed if c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
  assert tokens == [entry.token for entry in content]
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


@pytest.mark.parametrize(
  "endpoint, fields, param",
  [
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    (
      "chat",
      {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
      "response_format",
    ),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
  ],
)
def test_what_jaxlm_cannot_do_is_a_400_naming_the_field(client, endpoint, fields, param):
  client, name, _ = client
  with pytest.raises(openai.BadRequestError) as caught:
    if endpoint == "chat":
      client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], **fields)
    else:
      _complete(client, name, max_tokens=2, **fields)
  assert caught.value.status_code == 400
  error = caught.value.body
  assert error["param"] == param and param in error["message"], error
