"""The HTTP server on 127.0.0.1 (ephemeral port) with a real HTTP client: answers, streaming, the OpenAI
fields (n, logprobs, echo, user, model), request ids and logs, and every bad request a 4xx JSON error."""

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import time

import aiohttp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import error_line, files_config, run_in_process

from jaxlm import hf, loader
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.inference import decode
from jaxlm.inference import logprobs as scoring
from jaxlm.inference import server as serve
from jaxlm.models import transformer as model_lib

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_corpus):
  """A run with random weights (the server does not care whether they were trained)."""
  config = files_config(text_corpus)
  params = model_lib.build(config.model).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(run_dir):
  app = serve.app_for_run(run_dir, max_batch=8)
  background = serve.BackgroundServer(app)
  yield background, app
  background.close()


@pytest.fixture(scope="module")
def loaded(run_dir):
  return loader.load(run_dir)


@pytest.fixture(scope="module")
def expected_text(loaded):
  """What each prompt generates alone, outside the server (same cache length, so the same compiled shapes)."""
  generator = decode.Generator(loaded.config.model, loaded.params, cache_len=128)
  return lambda *args, **kwargs: _alone(loaded.tokenizer, generator, *args, **kwargs)


def _alone(tok, generator, prompt, max_tokens, temperature=0.0, seed=0, top_k=0, top_p=1.0):
  ids = [tok.eos_id] + list(tok.encode(prompt))
  out = generator.generate([ids], max_tokens, decode.Sampling(temperature, top_k, top_p, seed), [tok.eos_id])
  return tok.decode(out[0])


async def post(session, url, body, headers=JSON):
  data = body if isinstance(body, (bytes, str)) else json.dumps(body)
  async with session.post(url + "/v1/completions", data=data, headers=headers) as response:
    return response.status, await response.json()


GOOD = [
  {
    "prompt": f"def f{i}(x):",
    "max_tokens": 4 + i % 5,
    "temperature": 0.8 * (i % 2),
    "seed": i,
    "top_p": 0.9,
    "top_k": 40 * (i % 3),
  }
  for i in range(24)
]
BAD = [
  (b"{not json", "body"),
  ({"prompt": 3}, "prompt"),
  ({"prompt": ""}, "prompt"),
  ({"prompt": "x" * 80}, "prompt"),
  ({"prompt": "hi", "max_tokens": 62}, "max_tokens"),
  ({"prompt": "hi", "nonsense": 1}, "nonsense"),
  ({"prompt": "hi", "top_p": 0}, "top_p"),
  ({"prompt": "hi", "stop": [1]}, "stop"),
]


def test_concurrent_requests_with_bad_ones_mixed_in(server, expected_text, caplog):
  background, app = server

  async def main():
    async with aiohttp.ClientSession() as session:
      async with session.get(background.url + "/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
      async with session.get(background.url + "/v1/models") as r:
        assert (await r.json())["data"][0]["max_len"] == 64
      requests = [post(session, background.url, body) for body in GOOD]
      requests += [post(session, background.url, body) for body, _ in BAD]
      return await asyncio.gather(*requests)

  steps_before = app[serve.ENGINE].steps
  log_compiles = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)  # the config, not its context: the decode thread compiles
  try:
    with caplog.at_level(logging.WARNING):
      results = asyncio.run(main())
  finally:
    jax.config.update("jax_log_compiles", log_compiles)
  for (status, body), request in zip(results[: len(GOOD)], GOOD):
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == expected_text(
      request["prompt"],
      request["max_tokens"],
      request["temperature"],
      request["seed"],
      request["top_k"],
      request["top_p"],
    )
    assert body["usage"]["completion_tokens"] <= request["max_tokens"]
  for (status, body), (_, field) in zip(results[len(GOOD) :], BAD):
    assert status == 400 and body["error"]["param"] == field, body
  # 24 good requests (4 to 8 tokens each) shared decode steps: 8 slots, refilled as requests finished.
  assert app[serve.ENGINE].steps - steps_before <= sum(r["max_tokens"] for r in GOOD) // 4
  # One prefill compiled per shape (greedy and sampled, one prompt width): the steps return the state as the
  # first prefill took it, so no later request compiles again while every slot waits.
  compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
  assert compiled.count("Compiling jit(_insert_fn)") == 2, compiled
  # Ids are unique, not a counter.
  ids = [body["id"] for _, body in results[: len(GOOD)]]
  assert len(set(ids)) == len(ids) and "cmpl-0" not in ids


async def _events(session, url, body):
  async with session.post(url + "/v1/completions", json=body) as r:
    assert r.headers["Content-Type"].startswith("text/event-stream")
    return [line[len(b"data: ") :].strip() async for line in r.content if line.startswith(b"data: ")]


def test_streaming_and_stop_strings(server, expected_text):
  background, _ = server
  full = expected_text("import os", 20)

  async def main():
    async with aiohttp.ClientSession() as session:
      events = await _events(session, background.url, {"prompt": "import os", "max_tokens": 20, "stream": True})
      stop = full[3:5]
      stopped = await post(session, background.url, {"prompt": "import os", "max_tokens": 20, "stop": stop})
      return events, stop, stopped

  events, stop, (status, stopped) = asyncio.run(main())
  assert events[-1] == b"[DONE]"
  chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
  assert "".join(c["text"] for c in chunks) == full
  assert chunks[-1]["finish_reason"] in ("stop", "length") and len(chunks) > 2
  assert status == 200 and stopped["choices"][0]["text"] == full[: full.index(stop)]
  assert stopped["choices"][0]["finish_reason"] == "stop"


def _model_logprobs(loaded, ids):
  """log p(ids[j] | ids[:j]) for j >= 1, and the top-5 ids at each position, from one forward pass."""
  module = model_lib.build(loaded.config.model)
  logits = module.apply({"params": loaded.params}, jnp.asarray([ids]))[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  chosen = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
  return chosen, [list(np.argsort(-logp[j - 1])[:5]) for j in range(1, len(ids))]


def test_n_logprobs_echo_user_and_model(server, run_dir, loaded, expected_text, caplog):
  background, _ = server
  tok = loaded.tokenizer
  prompt = "def parse(text):"
  sampled = {
    "prompt": prompt,
    "max_tokens": 6,
    "n": 3,
    "temperature": 0.9,
    "seed": 5,
    "user": "someone",
    "model": run_dir.resolve().name,
  }
  scored = {"prompt": prompt, "max_tokens": 6, "logprobs": 3, "echo": True}

  async def main():
    async with aiohttp.ClientSession() as session:
      return (
        await post(session, background.url, sampled),
        await post(session, background.url, scored),
        await _events(session, background.url, {**scored, "stream": True, "n": 2}),
        await post(session, background.url, {"prompt": prompt, "model": "other"}),
      )

  with caplog.at_level(logging.INFO, logger="jaxlm.inference.server"):
    (status, many), (status2, body), events, (status3, wrong_model) = asyncio.run(main())
  assert status == 200 and [c["index"] for c in many["choices"]] == [0, 1, 2]
  for i, choice in enumerate(many["choices"]):  # choice i samples with seed + i
    assert choice["text"] == expected_text(prompt, 6, 0.9, 5 + i)
  assert 3 <= many["usage"]["completion_tokens"] <= 3 * 6

  assert status2 == 200
  choice = body["choices"][0]
  completion = expected_text(prompt, 6)
  assert choice["text"] == prompt + completion
  logprobs = choice["logprobs"]
  prompt_ids = [int(i) for i in tok.encode(prompt)]
  completion_ids = [int(i) for i in tok.encode(completion)]
  # Every token of prompt + completion, scored by the model itself (the first prompt token after EOS).
  want, want_top = _model_logprobs(loaded, [tok.eos_id] + prompt_ids + completion_ids)
  assert logprobs["tokens"] == [scoring.token_text(tok, i) for i in prompt_ids + completion_ids]
  np.testing.assert_allclose(logprobs["token_logprobs"], want, atol=2e-4)
  offsets = logprobs["text_offset"]
  assert offsets[: len(prompt) + 1] == list(range(len(prompt) + 1))  # one ASCII byte per prompt token
  assert offsets == sorted(offsets) and offsets[-1] < len(prompt + completion)
  for top, ids, chosen in zip(logprobs["top_logprobs"], want_top, want):
    assert list(top) == [scoring.token_text(tok, int(i)) for i in ids[:3]]
    assert max(top.values()) >= chosen - 2e-4
  # Greedy: each completion token is its step's most likely one.
  for top, lp in zip(logprobs["top_logprobs"][len(prompt_ids) :], logprobs["token_logprobs"][len(prompt_ids) :]):
    assert max(top.values()) == pytest.approx(lp, abs=1e-6)

  # Streaming n=2 with echo and logprobs: each choice's chunks add up to the same text and log-probabilities.
  assert events[-1] == b"[DONE]"
  for index in (0, 1):
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    chunks = [c for c in chunks if c["index"] == index]
    assert "".join(c["text"] for c in chunks) == prompt + completion
    streamed = [lp for c in chunks for lp in c["logprobs"]["token_logprobs"]]
    np.testing.assert_allclose(streamed, want, atol=2e-4)

  assert status3 == 404 and wrong_model["error"]["param"] == "model"
  lines = [r.getMessage() for r in caplog.records if r.name == "jaxlm.inference.server"]
  new_tokens = many["usage"]["completion_tokens"]
  assert any(
    many["id"] in line
    and " 200 " in line
    and "prompt_tokens=17" in line
    and f"new_tokens={new_tokens}" in line
    and "latency=" in line
    for line in lines
  ), lines
  assert sum(many["id"] in line for line in lines) == 1


NESTED = b"[" * 100_000 + b"]" * 100_000
FUZZ = [  # (method, path, body, headers, status, param)
  ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', JSON, 400, "prompt"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "stop": "\\udfff"}', JSON, 400, "stop"),
  ("POST", "/v1/completions", NESTED, JSON, 400, "body"),
  ("POST", "/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415, "Content-Type"),
  ("POST", "/v1/completions", b'{"prompt": "hi"}', {}, 415, "Content-Type"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', JSON, 400, "body"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', JSON, 400, "body"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', JSON, 400, "temperature"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "top_k": 1e9}', JSON, 400, "top_k"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "top_k": 1000000000}', JSON, 400, "top_k"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "top_k": 100000000000000000000}', JSON, 400, "top_k"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "seed": -1}', JSON, 400, "seed"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "n": 0}', JSON, 400, "n"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "n": 1000}', JSON, 400, "n"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "logprobs": 6}', JSON, 400, "logprobs"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "logprobs": true}', JSON, 400, "logprobs"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "echo": 1}', JSON, 400, "echo"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "stream": "yes"}', JSON, 400, "stream"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "user": 7}', JSON, 400, "user"),
  ("POST", "/v1/completions", b'{"prompt": [["hi"]]}', JSON, 400, "prompt"),
  ("POST", "/v1/completions", b'{"prompt": [1, 99999]}', JSON, 400, "prompt"),
  ("POST", "/v1/completions", b'{"prompt": []}', JSON, 400, "prompt"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "best_of": 2}', JSON, 400, "best_of"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "suffix": "x"}', JSON, 400, "suffix"),
  (
    "POST",
    "/v1/completions",
    b'{"prompt": "hi", "response_format": {"type": "json_object"}}',
    JSON,
    400,
    "response_format",
  ),
  (
    "POST",
    "/v1/completions",
    b'{"prompt": "hi", "stream_options": {"include_usage": true}}',
    JSON,
    400,
    "stream_options",
  ),
  ("POST", "/v1/completions", b'{"prompt": "hi", "presence_penalty": 3}', JSON, 400, "presence_penalty"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "logit_bias": {"x": 1}}', JSON, 400, "logit_bias"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "logit_bias": {"5": 101}}', JSON, 400, "logit_bias"),
  ("POST", "/v1/completions", b'{"prompt": "hi", "max_completion_tokens": 0}', JSON, 400, "max_completion_tokens"),
  ("POST", "/v1/chat/completions", b'{"messages": [], "top_logprobs": 2}', JSON, 400, "top_logprobs"),
  ("POST", "/v1/completions", b"[]", JSON, 400, "body"),
  ("POST", "/v1/completions", b"\xff\xfe", JSON, 400, "body"),
  ("POST", "/v1/completions", b"", JSON, 400, "body"),
  ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}', JSON, 413, "body"),
  ("GET", "/v1/completions", None, {}, 405, "method"),
  ("GET", "/nowhere", None, {}, 404, "path"),
  ("POST", "/v1/chat/completions", b"{}", JSON, 400, "messages"),  # the route exists (tests/integration/test_chat.py)
]


def test_every_bad_request_gets_a_4xx_json_error_naming_the_field(server, caplog):
  background, _ = server

  async def send(session, method, path, body, headers):
    async with session.request(method, background.url + path, data=body, headers=headers) as r:
      return r.status, r.headers.get("Content-Type", ""), await r.read()

  async def main():
    async with aiohttp.ClientSession() as session:
      answers = [await send(session, *case[:4]) for case in FUZZ]
      async with session.get(background.url + "/health") as r:
        return answers, r.status

  with caplog.at_level(logging.INFO):
    answers, health = asyncio.run(main())
  for (method, path, body, _, status, param), (got, content_type, raw) in zip(FUZZ, answers):
    case = f"{method} {path} {(body or b'')[:60]!r}"
    assert got == status and content_type.startswith("application/json"), (case, got, raw[:300])
    error = json.loads(raw)["error"]
    assert error["param"] == param and error["message"] and error["code"] == status, (case, error)
  assert health == 200  # still serving
  assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


class _SlowBytes:
  """A stand-in decoder (`batching.SlotDecoder`'s interface, one slot) that emits given UTF-8 bytes one token
  per step, `delay` seconds apart, then EOS."""

  slots = 1

  def __init__(self, text: str, delay: float = 0.0):
    self.tokens = [b + tokenizer_lib.ByteTokenizer.offset for b in text.encode()]
    self.delay = delay
    self.cfg = type("Cfg", (), {"max_len": 256, "vocab_size": 260})()
    self.emitted = 0

  def _next(self) -> int:
    self.emitted += 1
    return self.tokens[self.emitted - 1] if self.emitted <= len(self.tokens) else tokenizer_lib.ByteTokenizer().eos_id

  def insert(self, row, ids, sampling, bias, score_prompt):
    self.emitted = 0
    return self._next(), {}

  def step(self, tokens_B, settings):
    time.sleep(self.delay)
    return np.asarray([self._next()]), {}


def test_streams_whole_characters_and_a_disconnect_is_one_log_line(caplog):
  text = "é€😀a" * 4

  async def main(url):
    async with aiohttp.ClientSession() as session:
      return await _events(session, url, {"prompt": "x", "max_tokens": 200, "stream": True})

  tok = tokenizer_lib.ByteTokenizer()
  whole = serve.BackgroundServer(serve.make_app(_SlowBytes(text), tok, "bytes", stop_ids=[tok.eos_id]))
  slow = serve.BackgroundServer(serve.make_app(_SlowBytes(text * 4, 0.02), tok, "bytes", stop_ids=[tok.eos_id]))
  try:
    with caplog.at_level(logging.DEBUG):
      events = asyncio.run(main(whole.url))
      asyncio.run(_hang_up(slow.url))
      deadline = time.time() + 20
      while time.time() < deadline and not any("client-disconnected" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
  finally:
    whole.close()
    slow.close()
  texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
  pieces = [t for t in texts if t]  # the last event may carry the finish reason alone
  assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
  assert len(pieces) <= len(text)  # at most one event per character, never one per byte
  lines = [r for r in caplog.records if "client-disconnected" in r.getMessage()]
  assert len(lines) == 1 and lines[0].name == "jaxlm.inference.server"
  assert not [r for r in caplog.records if r.exc_info or "Error handling request" in r.getMessage()]


async def _hang_up(url):
  """Reads the first event of a long stream, then closes the connection."""
  async with aiohttp.ClientSession() as session:
    async with session.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}) as r:
      await r.content.readline()


def test_token_offsets_and_texts_for_split_and_invalid_bytes():
  tok = tokenizer_lib.ByteTokenizer()
  ids = [int(i) for i in tok.encode("aé")] + [0xA7 + tok.offset] + [int(i) for i in tok.encode("b")]
  assert tok.decode(ids) == "aé\ufffdb"
  # é's two bytes both start at character 1; the invalid byte is a character of its own.
  assert scoring.char_offsets(tok, ids, 0, len(ids)) == [0, 1, 1, 2, 3]
  assert [scoring.token_text(tok, i) for i in ids] == ["a", "bytes:\\xc3", "bytes:\\xa9", "bytes:\\xa7", "b"]
  assert scoring.token_text(tok, tok.eos_id) == "<eos>"


HALF_BODY = (
  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
  b'{"prompt": '
)


def _exchange(port: int, data: bytes, hang_up: bool = False) -> bytes:
  """Sends `data` on a fresh connection and reads until the server closes it (a 60 s cap, so a server that holds
  the connection fails the test instead of hanging it); `hang_up` closes it right after sending instead."""
  with socket.create_connection(("127.0.0.1", port)) as connection:
    connection.sendall(data)
    if hang_up:  # after a moment, so that the server has usually begun to read the body
      connection.settimeout(0.2)
      with contextlib.suppress(TimeoutError):
        connection.recv(1)
      return b""
    connection.settimeout(60)
    received = b""
    try:
      while chunk := connection.recv(65536):
        received += chunk
    except TimeoutError:
      pytest.fail(f"the server held the connection open: {data[:80]!r}")
    return received


def _json_answer(raw: bytes) -> tuple[int, str, dict]:
  head, body = raw.split(b"\r\n\r\n", 1)
  status = int(head.split(b" ")[1])
  content_type = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-type:"))
  return status, content_type.decode(), json.loads(body)


def test_slow_malformed_and_vanishing_clients_are_closed_with_json_errors(caplog):
  app = serve.make_app(_SlowBytes("ok"), tokenizer_lib.ByteTokenizer(), "bytes", header_timeout=1.0, body_timeout=1.0)
  background = serve.BackgroundServer(app)
  malformed = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 10_000 + b"\r\n\r\n",
  ]
  try:
    with caplog.at_level(logging.INFO), concurrent.futures.ThreadPoolExecutor(20) as pool:
      half_bodies = list(pool.map(lambda _: _exchange(background.port, HALF_BODY), range(20)))
      half_header = _exchange(background.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
      silent = _exchange(background.port, b"")
      bad = [_exchange(background.port, data) for data in malformed]
      for _ in range(3):
        _exchange(background.port, HALF_BODY, hang_up=True)
      good = _exchange(
        background.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 15\r\n"
        b'Connection: close\r\n\r\n{"prompt": "a"}',
      )
      deadline = time.time() + 30
      while time.time() < deadline and sum("client-disconnected" in r.getMessage() for r in caplog.records) < 3:
        time.sleep(0.05)
  finally:
    background.close()
  # 20 bodies that stop half way: each a JSON 408 naming the body, then the connection closed.
  for raw in half_bodies:
    status, content_type, body = _json_answer(raw)
    assert status == 408 and "application/json" in content_type and body["error"]["param"] == "body", raw
  # Headers that stop half way, and a connection that sends nothing, are closed without an answer.
  assert half_header == b"" and silent == b""
  # Malformed HTTP gets the API's JSON 400, not aiohttp's plain text.
  for raw, data in zip(bad, malformed):
    status, content_type, body = _json_answer(raw)
    assert status == 400 and "application/json" in content_type, (data[:40], raw[:300])
    assert body["error"]["param"] == "http" and "malformed HTTP" in body["error"]["message"], body
  assert _json_answer(good)[0] == 200  # still serving
  # Clients that hang up mid-body: one quiet line each, no 500, no traceback.
  messages = [r.getMessage() for r in caplog.records if r.name == "jaxlm.inference.server"]
  assert 1 <= sum("client-disconnected" in m for m in messages) <= 3, messages  # a hang-up before reading: none
  assert not [m for m in messages if " 500 " in m]
  assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_a_timeout_that_is_not_positive_is_one_line(tmp_path, capfd):
  result = run_in_process(["serve", "--workdir", str(tmp_path), "--body-timeout", "0"], capfd)
  assert result.returncode == 2 and "--body-timeout 0.0: must be a positive number of seconds" in error_line(result)
