"""The HTTP server on 127.0.0.1 (ephemeral port) with a real HTTP client: answers, streaming, bad input, batching."""

import asyncio
import json

import aiohttp
import jax
import jax.numpy as jnp
import pytest

from jaxlm import decode, hf, model as model_lib, serve

from conftest import files_config


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
def expected_text(run_dir):
  """What each prompt generates alone, outside the server (same cache length, so the same compiled shapes)."""
  run = decode.load_run(run_dir)
  generator = decode.Generator(run.config.model, run.params, cache_len=128)
  return lambda *args, **kwargs: _alone(run.tokenizer, generator, *args, **kwargs)


def _alone(tok, generator, prompt, max_tokens, temperature=0.0, seed=0, top_k=0, top_p=1.0):
  ids = [tok.eos_id] + list(tok.encode(prompt))
  out = generator.generate([ids], max_tokens, decode.Sampling(temperature, top_k, top_p, seed), [tok.eos_id])
  return tok.decode(out[0])


async def post(session, url, body):
  data = body if isinstance(body, (bytes, str)) else json.dumps(body)
  async with session.post(url + "/v1/completions", data=data) as response:
    return response.status, await response.json()


GOOD = [{"prompt": f"def f{i}(x):", "max_tokens": 4 + i % 5, "temperature": 0.8 * (i % 2), "seed": i,
         "top_p": 0.9, "top_k": 40 * (i % 3)} for i in range(24)]
BAD = [(b"{not json", "body"), ({"prompt": 3}, "prompt"), ({"prompt": ""}, "prompt"),
       ({"prompt": "x" * 80}, "prompt"), ({"prompt": "hi", "max_tokens": 62}, "max_tokens"),
       ({"prompt": "hi", "nonsense": 1}, "nonsense"), ({"prompt": "hi", "top_p": 0}, "top_p"),
       ({"prompt": "hi", "stop": [1]}, "stop")]


def test_concurrent_requests_with_bad_ones_mixed_in(server, expected_text):
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

  batches_before = app[serve.ENGINE].batches
  results = asyncio.run(main())
  for (status, body), request in zip(results[:len(GOOD)], GOOD):
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == expected_text(request["prompt"], request["max_tokens"], request["temperature"],
                                           request["seed"], request["top_k"], request["top_p"])
    assert body["usage"]["completion_tokens"] <= request["max_tokens"]
  for (status, body), (_, field) in zip(results[len(GOOD):], BAD):
    assert status == 400 and body["error"]["param"] == field, body
  # 24 good requests took far fewer decode batches: waiting requests were grouped.
  assert app[serve.ENGINE].batches - batches_before <= 12


def test_streaming_and_stop_strings(server, expected_text):
  background, _ = server
  full = expected_text("import os", 20)

  async def main():
    async with aiohttp.ClientSession() as session:
      body = {"prompt": "import os", "max_tokens": 20, "stream": True}
      async with session.post(background.url + "/v1/completions", json=body) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: "):].strip() async for line in r.content if line.startswith(b"data: ")]
      stop = full[3:5]
      stopped = await post(session, background.url, {"prompt": "import os", "max_tokens": 20, "stop": stop})
      return events, stop, stopped

  events, stop, (status, stopped) = asyncio.run(main())
  assert events[-1] == b"[DONE]"
  chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
  assert "".join(c["text"] for c in chunks) == full
  assert chunks[-1]["finish_reason"] in ("stop", "length") and len(chunks) > 2
  assert status == 200 and stopped["choices"][0]["text"] == full[:full.index(stop)]
  assert stopped["choices"][0]["finish_reason"] == "stop"
