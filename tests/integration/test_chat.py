"""Dialogue: POST /v1/chat/completions on `jaxlm serve` and the `jaxlm chat` terminal loop, against the same
conversation decoded in-process; training on chat data end to end through the CLI."""

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import jax
import jax.numpy as jnp
import pytest
from support import CONVERSATIONS, RECORDS, REPO, tiny_config, write_jsonl, xla_flags

from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.inference import chat, decode
from jaxlm.inference import server as serve
from jaxlm.models import transformer as model_lib

JSON = {"Content-Type": "application/json"}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A byte-tokenizer run with random weights and a 128-token context (the default chat template)."""
  config = tiny_config(max_len=128)
  params = model_lib.build(config.model).init(jax.random.key(1), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("chat_run"))


@pytest.fixture(scope="module")
def session(run_dir):
  """An in-process ChatSession with the server's cache length, so both compile the same shapes."""
  run = loader.load(run_dir)
  s = chat.ChatSession(run, max_tokens=12)
  s.generator = decode.Generator(run.config.model, run.params, cache_len=2 * decode.round_up(128, 16))
  return s


@pytest.fixture(scope="module")
def server(run_dir):
  background = serve.BackgroundServer(serve.app_for_run(run_dir, max_batch=4))
  yield background
  background.close()


def expected_reply(session, messages):
  session.messages = list(messages[:-1])
  return session.reply(messages[-1]["content"])


async def _post(url, body, stream=False):
  async with aiohttp.ClientSession() as client:
    async with client.post(url + "/v1/chat/completions", data=json.dumps(body), headers=JSON) as response:
      if not stream:
        return response.status, await response.json()
      return response.status, [line for line in (await response.text()).split("\n\n") if line]


def test_chat_completions_answer_as_the_conversation_decodes(server, session):
  expected = expected_reply(session, HELLO)
  assert expected  # twelve tokens of a random model: some text
  status, body = asyncio.run(_post(server.url, {"messages": HELLO, "max_tokens": 12}))
  assert status == 200, body
  assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
    "role": "assistant",
    "content": expected,
  }
  assert body["choices"][0]["finish_reason"] == "length"
  assert body["usage"]["prompt_tokens"] == len(session.prompt_ids(HELLO))
  # A longer conversation: the earlier turns are part of the prompt.
  messages = CONVERSATIONS[1][1:4]
  status, body = asyncio.run(_post(server.url, {"messages": messages, "max_tokens": 12}))
  assert body["choices"][0]["message"]["content"] == expected_reply(session, messages) != expected
  # Streaming: the role first, then deltas that add up to the answer, a finish reason, and [DONE].
  status, events = asyncio.run(_post(server.url, {"messages": HELLO, "max_tokens": 12, "stream": True}, True))
  assert status == 200 and events[-1] == "data: [DONE]"
  chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  # A stop string cuts the answer before it; sampling fields pass through (n choices, seeds).
  stop = expected[3:5]
  status, body = asyncio.run(_post(server.url, {"messages": HELLO, "max_tokens": 12, "stop": stop}))
  assert body["choices"][0]["message"]["content"] == expected[: expected.index(stop)]
  assert body["choices"][0]["finish_reason"] == "stop"
  status, body = asyncio.run(
    _post(server.url, {"messages": HELLO, "max_tokens": 4, "n": 2, "temperature": 1.0, "top_p": 0.9, "seed": 5})
  )
  assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]


def test_the_default_template_turn_end_stops_the_answer(session):
  assert session.template.turn_end == "<|end|>" and session.stop == ["<|end|>"]
  assert session.stop_ids == [session.tokenizer.eos_id]  # a byte run spells the marker as text


@pytest.mark.parametrize(
  "body, param",
  [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 200}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ({"messages": HELLO, "prompt": "hi"}, "prompt"),
    ({"messages": HELLO, "logprobs": 3}, "logprobs"),
    ({"messages": HELLO, "temperature": -1}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 1000}, "max_tokens"),
    ({"messages": HELLO, "stop": [1]}, "stop"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "model": "other"}, "model"),
  ],
)
def test_bad_chat_requests_name_the_field(server, body, param):
  status, answer = asyncio.run(_post(server.url, body))
  assert status in (400, 404) and answer["error"]["param"] == param, answer
  assert answer["error"]["message"] and "\n" not in answer["error"]["message"]


def test_run_loop_keeps_the_conversation_and_resets(session):
  """The terminal loop in-process: answers only (piped input), history kept until /reset."""
  import io

  session.reset()
  first, second = session.reply("Hello there"), session.reply("And then?")
  session.reset()
  out = io.StringIO()
  chat.run_loop(session, io.StringIO("Hello there\nAnd then?\n/reset\n\nHello there\n"), out, interactive=False)
  assert out.getvalue() == f"{first}\n{second}\n{first}\n"
  assert [m["role"] for m in session.messages] == ["user", "assistant"]  # /reset dropped the first two turns


@pytest.mark.slow
def test_chat_cli_keeps_the_conversation(run_dir, session):
  """`jaxlm chat` with piped stdin: each answer equals the in-process one for the conversation so far."""
  session.reset()
  generator = session.generator
  session.generator = decode.Generator(session.model_cfg, generator.params)  # the CLI's per-call cache length
  try:
    first = session.reply("Hello there")
    second = session.reply("And then?")
    fresh = expected_reply(session, [{"role": "user", "content": "And then?"}])
  finally:
    session.generator = generator
  assert second != fresh  # the second answer depends on the first turn
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  result = subprocess.run(
    [sys.executable, "-m", "jaxlm", "chat", "--workdir", str(run_dir), "--max-tokens", "12"],
    input="Hello there\nAnd then?\n/reset\n\n/exit\nnever read\n",
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == f"{first}\n{second}\n"


@pytest.mark.slow
def test_train_and_eval_on_chat_data_through_the_cli(tmp_path, capsys):
  """`jaxlm train` on jsonl records (byte tokenizer, default template) for a few steps, then `jaxlm eval`."""
  train = write_jsonl(tmp_path / "train.jsonl", RECORDS)
  valid = write_jsonl(tmp_path / "valid.jsonl", RECORDS[:8])
  workdir = tmp_path / "run"
  args = [
    "train",
    "--config",
    "configs/tiny.py",
    "--workdir",
    str(workdir),
    "--config.data.source=jsonl",
    f"--config.data.paths={train}",
    f"--config.data.validation_paths={valid}",
    "--config.data.seq_len=192",
    "--config.model.max_len=192",
    "--config.train.num_steps=4",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.global_batch_size=8",
    "--config.eval.batch_size=8",
  ]
  assert main.main(args) == 0
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("val_loss" in m for m in metrics)
  capsys.readouterr()
  assert main.main(["eval", "--workdir", str(workdir)]) == 0
  result = json.loads(capsys.readouterr().out.split("\nstep ")[0])
  # Scored tokens are the answers' only: the completions, assistant turns and their closing EOS.
  assert 0 < result["tokens"] < sum(len(json.dumps(r)) for r in RECORDS[:8])
