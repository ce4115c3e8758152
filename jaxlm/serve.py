"""An HTTP completion server: aiohttp in front, one decode thread behind, requests batched together.

Why aiohttp: one well-kept package gives both the asyncio server (with
server-sent-event streaming via `StreamResponse`) and the client the tests
use, with no ASGI layer between them. The decode loop is blocking JAX work,
so it runs in one worker thread: requests that arrive while a batch decodes
wait in a queue, and the worker takes up to `max_batch` of them as its next
batch. The batch is padded to `max_batch` rows and the cache is always
`model.max_len` long, so the decode step compiles once for the server's life.

API (OpenAI-style):
  POST /v1/completions {prompt, max_tokens=16, temperature=0, top_p=1, top_k=0,
                        stop=null|str|[str], seed=0, stream=false, model (ignored)}
  GET /health, GET /v1/models
Bad input gets a 400 with {"error": {"message", "param"}} naming the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import queue
import threading
import time
from pathlib import Path

from aiohttp import web

from jaxlm import decode

_FIELDS = {"prompt": (str,), "max_tokens": (int,), "temperature": (int, float), "top_p": (int, float),
           "top_k": (int,), "stop": (str, list, type(None)), "seed": (int,), "stream": (bool,), "model": (str,)}


ENGINE = web.AppKey("engine", object)


class RequestError(ValueError):
  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass
class Job:
  ids: list[int]
  max_tokens: int
  sampling: dict
  stop: list[str]
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  tokens: list[int] = dataclasses.field(default_factory=list)
  sent: int = 0            # characters of text already streamed
  done: bool = False

  def put(self, event: dict) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def parse_request(body: bytes, tokenizer, max_len: int, prefix: list[int]) -> dict:
  """The validated request fields (with defaults) and the prompt's ids; RequestError names the bad field."""
  try:
    request = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError("body", f"the request body is not valid JSON: {e}") from None
  if not isinstance(request, dict):
    raise RequestError("body", "the request body must be a JSON object")
  for key, value in request.items():
    if key not in _FIELDS:
      raise RequestError(key, f"unknown field '{key}'; allowed: {', '.join(sorted(_FIELDS))}")
    # bool is an int in Python; only 'stream' may be one.
    if not isinstance(value, _FIELDS[key]) or (isinstance(value, bool) and key != "stream"):
      raise RequestError(key, f"field '{key}' has the wrong type ({type(value).__name__})")
  r = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": None, "seed": 0, "stream": False,
       **request}
  if "prompt" not in r or not r["prompt"]:
    raise RequestError("prompt", "field 'prompt' is required and must be a non-empty string")
  if r["temperature"] < 0:
    raise RequestError("temperature", "field 'temperature' must be >= 0")
  if not 0 < r["top_p"] <= 1:
    raise RequestError("top_p", "field 'top_p' must be in (0, 1]")
  if r["top_k"] < 0:
    raise RequestError("top_k", "field 'top_k' must be >= 0")
  if not 0 <= r["seed"] < 2 ** 32:
    raise RequestError("seed", "field 'seed' must be in [0, 2^32)")
  stop = [r["stop"]] if isinstance(r["stop"], str) else (r["stop"] or [])
  if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise RequestError("stop", "field 'stop' must be a non-empty string or a list of at most 4 of them")
  ids = prefix + [int(i) for i in tokenizer.encode(r["prompt"])]
  if len(ids) >= max_len:
    raise RequestError("prompt", f"the prompt has {len(ids)} tokens; the model's context is {max_len}")
  if not 1 <= r["max_tokens"] <= max_len - len(ids):
    raise RequestError("max_tokens", f"field 'max_tokens' must be in [1, {max_len - len(ids)}] for this prompt "
                                     f"({len(ids)} tokens, context {max_len})")
  return {**r, "stop": stop, "ids": ids}


class Engine:
  """The decode worker: groups queued jobs into batches and streams their tokens back."""

  def __init__(self, generator: decode.Generator, tokenizer, max_batch: int = 8, stop_ids=()):
    self.generator, self.tokenizer, self.max_batch = generator, tokenizer, max_batch
    self.stop_ids = list(stop_ids)
    self.jobs: queue.Queue[Job] = queue.Queue()
    self.batches = 0
    threading.Thread(target=self._work, daemon=True, name="jaxlm-decode").start()

  def _work(self) -> None:
    while True:
      batch = [self.jobs.get()]
      time.sleep(0.002)  # let requests that arrive together share the batch
      while len(batch) < self.max_batch:
        try:
          batch.append(self.jobs.get_nowait())
        except queue.Empty:
          break
      try:
        self._run(batch)
      except Exception as e:  # a failed batch answers its requests; the server keeps serving
        for job in batch:
          if not job.done:
            job.put({"error": f"decoding failed: {type(e).__name__}: {e}"})
      self.batches += 1

  def _run(self, batch: list[Job]) -> None:
    fields = lambda key: [job.sampling[key] for job in batch]
    sampling = decode.Sampling(fields("temperature"), fields("top_k"), fields("top_p"), fields("seed"))
    stream = self.generator.stream([job.ids for job in batch], [job.max_tokens for job in batch], sampling,
                                   self.stop_ids, batch_size=self.max_batch)
    for out in stream:
      for i, job in enumerate(batch):
        if job.done:
          continue
        if out.emit_B[i]:
          job.tokens.append(int(out.tokens_B[i]))
        reason = "stop" if out.stopped_B[i] else ("length" if out.finished_B[i] else None)
        self._emit(job, reason)
      if all(job.done for job in batch):
        stream.close()
        return

  def _emit(self, job: Job, reason: str | None) -> None:
    text = self.tokenizer.decode(job.tokens)
    for s in job.stop:
      if s in text:
        text, reason = text[:text.index(s)], "stop"
    if reason is None:
      # Hold back a possibly unfinished UTF-8 character and what could be the start of a stop string.
      hold = max([len(s) - 1 for s in job.stop] + [0])
      ready = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
      if ready > job.sent:
        job.put({"text": text[job.sent:ready]})
        job.sent = ready
      return
    job.done = True
    job.put({"text": text[job.sent:], "finish_reason": reason, "completion_tokens": len(job.tokens)})


def make_app(generator: decode.Generator, tokenizer, model_name: str, max_batch: int = 8,
             prefix: list[int] = (), stop_ids=()) -> web.Application:
  engine = Engine(generator, tokenizer, max_batch, stop_ids)
  max_len = generator.cfg.max_len
  ids = itertools.count()

  def error(status: int, param: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param}},
                             status=status)

  async def health(_):
    return web.json_response({"status": "ok", "batches": engine.batches})

  async def models(_):
    return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxlm",
                                                           "max_len": max_len}]})

  async def completions(request: web.Request):
    try:
      r = parse_request(await request.read(), tokenizer, max_len, list(prefix))
    except RequestError as e:
      return error(400, e.param, str(e))
    job = Job(r["ids"], r["max_tokens"], {k: r[k] for k in ("temperature", "top_k", "top_p", "seed")}, r["stop"],
              asyncio.get_running_loop())
    engine.jobs.put(job)
    head = {"id": f"cmpl-{next(ids)}", "object": "text_completion", "created": int(time.time()), "model": model_name}
    if not r["stream"]:
      text = []
      while True:
        event = await job.events.get()
        if "error" in event:
          return error(500, "", event["error"])
        text.append(event["text"])
        if "finish_reason" in event:
          usage = {"prompt_tokens": len(r["ids"]), "completion_tokens": event["completion_tokens"],
                   "total_tokens": len(r["ids"]) + event["completion_tokens"]}
          return web.json_response({**head, "choices": [{"index": 0, "text": "".join(text),
                                                         "finish_reason": event["finish_reason"]}], "usage": usage})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    while True:
      event = await job.events.get()
      if "error" in event:
        await response.write(f"data: {json.dumps({'error': {'message': event['error']}})}\n\n".encode())
        break
      choice = {"index": 0, "text": event["text"], "finish_reason": event.get("finish_reason")}
      await response.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
      if "finish_reason" in event:
        break
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response

  app = web.Application(client_max_size=1 << 20)
  app.add_routes([web.get("/health", health), web.get("/v1/models", models), web.post("/v1/completions", completions)])
  app[ENGINE] = engine
  return app


def app_for_run(workdir, step: int | None = None, int8: bool = False, max_batch: int = 8) -> web.Application:
  from jaxlm import quantize
  run = decode.load_run(workdir, step)
  params = quantize.quantize_params(run.params) if int8 else run.params
  model = run.config.model
  # Training data ends every document with EOS, so a new text starts after one (decoder-only models).
  prefix = [run.tokenizer.eos_id] if model.family == "decoder" else []
  # All rows share the slot index, so the cache must hold the longest (bucketed) prompt of a batch plus its
  # largest max_tokens: twice the context covers any batch, with one cache shape for the server's life.
  cache_len = 2 * decode.round_up(model.max_len, decode.PROMPT_BUCKET)
  generator = decode.Generator(model, params, cache_len=cache_len, start_id=run.tokenizer.bos_id)
  return make_app(generator, run.tokenizer, Path(workdir).name, max_batch, prefix, [run.tokenizer.eos_id])


def serve(workdir, host: str = "127.0.0.1", port: int = 8000, step: int | None = None, int8: bool = False,
          max_batch: int = 8) -> None:
  web.run_app(app_for_run(workdir, step, int8, max_batch), host=host, port=port,
              print=lambda msg: print(msg, flush=True))


class BackgroundServer:
  """Runs an app on host:port (0 picks a free port) in a thread with its own event loop; for tests and embedding."""

  def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
    self.loop = asyncio.new_event_loop()
    self.runner = web.AppRunner(app)
    started = threading.Event()

    def run():
      asyncio.set_event_loop(self.loop)
      self.loop.run_until_complete(self.runner.setup())
      site = web.TCPSite(self.runner, host, port)
      self.loop.run_until_complete(site.start())
      self.port = site._server.sockets[0].getsockname()[1]
      started.set()
      self.loop.run_forever()

    self.thread = threading.Thread(target=run, daemon=True)
    self.thread.start()
    started.wait()
    self.url = f"http://{host}:{self.port}"

  def close(self) -> None:
    asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join()
