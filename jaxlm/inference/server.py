"""An HTTP completion server: aiohttp in front, one decode thread behind, requests batched together.

Why aiohttp: one well-kept package gives both the asyncio server (with
server-sent-event streaming via `StreamResponse`) and the client the tests
use, with no ASGI layer between them. The decode loop is blocking JAX work,
so it runs in one worker thread: requests that arrive while a batch decodes
wait in a queue, and the worker takes up to `max_batch` of them as its next
batch. The batch is padded to `max_batch` rows and the cache is always
`model.max_len` long, so the decode step compiles once for the server's life.

API (the OpenAI completions API, legacy form):
  POST /v1/completions {prompt, max_tokens=16, temperature=0, top_p=1, top_k=0, stop=null|str|[str],
                        seed=0, stream=false, n=1, logprobs=null|0..5, echo=false, user, model}
  POST /v1/chat/completions: the same for OpenAI-style messages (jaxlm/inference/openai.py)
  GET /health, GET /v1/models
`n` decodes n rows (seeds seed, seed+1, ...); `logprobs` returns each token's
log-probability under the model (before temperature and filtering) and the
top-k alternatives; `echo` puts the prompt in front of the completion (with
its tokens' log-probabilities, a decoder-only model scoring its first token
after the EOS that starts every text). `model`, when given, must be the
served name. Every bad request gets a 4xx with {"error": {"message", "type",
"param", "code"}} naming the field: 404, 405, 413 and 415 included. Each
request is logged in one line: id, status, prompt and new tokens, latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import queue
import sys
import threading
import time
import uuid

import jax
from aiohttp import web

from jaxlm.inference import decode, logprobs as scoring
from jaxlm.models import quantize
from jaxlm.storage import fs

LOG = logging.getLogger("jaxlm.inference.server")
MAX_CHOICES = 16   # the most completions `n` may ask for
MAX_BODY_BYTES = 1 << 20

_NUMBER = (int, float)
_FIELDS = {"prompt": (str,), "max_tokens": (int,), "temperature": _NUMBER, "top_p": _NUMBER, "top_k": (int,),
           "stop": (str, list, type(None)), "seed": (int,), "stream": (bool,), "n": (int,),
           "logprobs": (int, type(None)), "echo": (bool,), "user": (str,), "model": (str,)}
_BOOLEANS = {"stream", "echo"}

ENGINE = web.AppKey("engine", object)
REQUEST_INFO = web.RequestKey("info", dict)


class RequestError(ValueError):
  """A bad request: the HTTP status, the field (`param`) at fault and a message that says the fix."""

  def __init__(self, param: str | None, message: str, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


# --- Requests ---------------------------------------------------------------------------------------

def _reject_constant(name: str):
  raise RequestError("body", f"the request body contains {name}, which is not valid JSON; send finite numbers")


def _check_text(field: str, text: str) -> None:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RequestError(field, f"field '{field}' contains an unpaired surrogate ({text[e.start]!r} at "
                              f"character {e.start}); send valid Unicode text") from None


def parse_request(body: bytes, tokenizer, max_len: int, prefix: list[int], vocab_size: int,
                  model_name: str = "") -> dict:
  """The validated request fields (with defaults) and the prompt's ids (`prefix` + encoded prompt).

  `vocab_size` bounds top_k; `model_name`, when given, is the only `model` accepted. RequestError names
  the bad field.
  """
  try:
    request = json.loads(body, parse_constant=_reject_constant)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError("body", f"the request body is not valid JSON: {e}") from None
  except RecursionError:
    raise RequestError("body", "the request body nests too deeply; send a flat JSON object") from None
  if not isinstance(request, dict):
    raise RequestError("body", "the request body must be a JSON object")
  for key, value in request.items():
    if key not in _FIELDS:
      raise RequestError(key, f"unknown field '{key}'; allowed: {', '.join(sorted(_FIELDS))}")
    # bool is an int in Python; only the boolean fields may be one.
    if not isinstance(value, _FIELDS[key]) or (isinstance(value, bool) != (key in _BOOLEANS) and value is not None):
      raise RequestError(key, f"field '{key}' has the wrong type ({type(value).__name__})")
  r = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "stop": None, "seed": 0, "stream": False,
       "n": 1, "logprobs": None, "echo": False, **request}
  if model_name and "model" in request and request["model"] != model_name:
    raise RequestError("model", f"model '{request['model']}' is not served here; this server serves "
                                f"'{model_name}' (GET /v1/models)", status=404)
  if "prompt" not in r or not r["prompt"]:
    raise RequestError("prompt", "field 'prompt' is required and must be a non-empty string")
  for key in ("temperature", "top_p"):
    if not math.isfinite(r[key]):
      raise RequestError(key, f"field '{key}' must be a finite number")
  if r["temperature"] < 0:
    raise RequestError("temperature", "field 'temperature' must be >= 0")
  if not 0 < r["top_p"] <= 1:
    raise RequestError("top_p", "field 'top_p' must be in (0, 1]")
  if not 0 <= r["top_k"] <= vocab_size:
    raise RequestError("top_k", f"field 'top_k' must be in [0, {vocab_size}] (the vocabulary; 0 turns it off)")
  if not 0 <= r["seed"] < 2 ** 32:
    raise RequestError("seed", "field 'seed' must be in [0, 2^32)")
  if not 1 <= r["n"] <= MAX_CHOICES:
    raise RequestError("n", f"field 'n' must be in [1, {MAX_CHOICES}]")
  if r["logprobs"] is not None and not 0 <= r["logprobs"] <= scoring.TOP_LOGPROBS:
    raise RequestError("logprobs", f"field 'logprobs' must be null or in [0, {scoring.TOP_LOGPROBS}]")
  stop = [r["stop"]] if isinstance(r["stop"], str) else (r["stop"] or [])
  if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise RequestError("stop", "field 'stop' must be a non-empty string or a list of at most 4 of them")
  _check_text("prompt", r["prompt"])
  for s in stop:
    _check_text("stop", s)
  ids = prefix + [int(i) for i in tokenizer.encode(r["prompt"])]
  if len(ids) >= max_len:
    raise RequestError("prompt", f"the prompt has {len(ids)} tokens; the model's context is {max_len}")
  if not 1 <= r["max_tokens"] <= max_len - len(ids):
    raise RequestError("max_tokens", f"field 'max_tokens' must be in [1, {max_len - len(ids)}] for this prompt "
                                     f"({len(ids)} tokens, context {max_len})")
  return {**r, "stop": stop, "ids": ids}


# --- The decode worker ------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """One completion (one of a request's `n` choices), filled by the decode thread."""
  index: int
  ids: list[int]
  max_tokens: int
  sampling: dict
  stop: list[str]
  events: asyncio.Queue    # shared by the request's choices: (index, event) pairs
  loop: asyncio.AbstractEventLoop
  logprobs: int | None = None
  echo_text: str | None = None  # the prompt, when `echo`
  prompt_start: int = 0         # ids[prompt_start:] are the prompt's own tokens (after the prefix)
  text_base: int = 0            # characters before the completion: completion text offsets start here
  tokens: list[int] = dataclasses.field(default_factory=list)
  scores: list[tuple] = dataclasses.field(default_factory=list)  # (logprob, top ids, top logprobs) per token
  sent: int = 0            # characters of completion text already sent
  scored_sent: int = 0     # tokens whose log-probabilities were already sent
  done: bool = False
  cancelled: bool = False  # the client went away: decode no further

  def put(self, event: dict) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))


class Engine:
  """The decode worker: groups queued jobs into batches and streams their text back."""

  def __init__(self, generator: scoring.ScoringGenerator, tokenizer, max_batch: int = 8, stop_ids=()):
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
      batch = [job for job in batch if not job.cancelled]
      if not batch:
        continue
      try:
        self._run(batch)
      except Exception as e:  # a failed batch answers its requests; the server keeps serving
        LOG.exception("decoding failed")
        for job in batch:
          if not job.done:
            job.put({"error": f"decoding failed: {type(e).__name__}: {e}"})
      self.batches += 1

  def _run(self, batch: list[Job]) -> None:
    fields = lambda key: [job.sampling[key] for job in batch]
    sampling = decode.Sampling(fields("temperature"), fields("top_k"), fields("top_p"), fields("seed"))
    stream = self.generator.stream([job.ids for job in batch], [job.max_tokens for job in batch], sampling,
                                   self.stop_ids, batch_size=self.max_batch)
    scoring = any(job.logprobs is not None for job in batch)
    self.generator.score_prompt_now = any(job.logprobs is not None and job.echo_text is not None for job in batch)
    for t, out in enumerate(stream):
      scores = jax.device_get(self.generator.scores) if scoring else {}
      for i, job in enumerate(batch):
        if job.done:
          continue
        if t == 0 and job.echo_text is not None:
          job.put({"text": job.echo_text, "logprobs": self._prompt_logprobs(job, i, scores)})
        if job.cancelled:
          job.done = True
          continue
        if out.emit_B[i]:
          job.tokens.append(int(out.tokens_B[i]))
          if scoring:
            job.scores.append((scores["logprob_B"][i], scores["top_ids_BxK"][i], scores["top_logprobs_BxK"][i]))
        reason = "stop" if out.stopped_B[i] else ("length" if out.finished_B[i] else None)
        self._emit(job, reason)
      if all(job.done for job in batch):
        stream.close()
        return

  def _logprobs(self, job: Job, ids, scores, offsets) -> dict | None:
    if job.logprobs is None:
      return None
    return scoring.logprobs_object(self.tokenizer, ids, scores, offsets, job.logprobs)

  def _prompt_logprobs(self, job: Job, row: int, scores: dict) -> dict | None:
    if job.logprobs is None:
      return None
    ids = job.ids[job.prompt_start:]
    # Position j of prompt_* scores token j + 1 of the row (the first token has no context).
    positions = range(job.prompt_start - 1, len(job.ids) - 1)
    if "prompt_logprob_BxP" in scores:
      rows = [(scores["prompt_logprob_BxP"][row, j], scores["prompt_top_ids_BxPxK"][row, j],
               scores["prompt_top_logprobs_BxPxK"][row, j]) if j >= 0 else (None, None, None) for j in positions]
    else:  # the prompt was a source for an encoder: it has no log-probabilities of its own
      rows = [(None, None, None)] * len(ids)
    return self._logprobs(job, ids, rows, scoring.char_offsets(self.tokenizer, ids, 0, len(ids)))

  def _emit(self, job: Job, reason: str | None) -> None:
    """Sends the completion text that is final: whole characters, past any possible stop string."""
    text = self.tokenizer.decode(job.tokens)
    truncated = False
    for s in job.stop:
      if s in text:
        text, reason, truncated = text[:text.index(s)], "stop", True
    if reason is None:
      # Hold back a possibly unfinished UTF-8 character and what could be the start of a stop string.
      hold = max([len(s) - 1 for s in job.stop] + [0])
      ready = len(text.rstrip("\ufffd")) - hold
      if ready > job.sent:
        job.put({"text": text[job.sent:ready], "logprobs": self._completion_logprobs(job, ready)})
        job.sent = ready
      return
    job.done = True
    logprobs = self._completion_logprobs(job, len(text) if truncated else None)
    job.put({"text": text[job.sent:], "logprobs": logprobs, "finish_reason": reason,
             "completion_tokens": len(job.tokens)})

  def _completion_logprobs(self, job: Job, ready: int | None) -> dict | None:
    """Log-probabilities of the tokens not yet sent that begin before character `ready` of the completion
    (None: all of them)."""
    if job.logprobs is None:
      return None
    offsets = scoring.char_offsets(self.tokenizer, job.tokens, job.scored_sent, len(job.tokens))
    count = len(offsets) if ready is None else sum(1 for o in offsets if o < ready)
    start, job.scored_sent = job.scored_sent, job.scored_sent + count
    return self._logprobs(job, job.tokens[start:job.scored_sent], job.scores[start:job.scored_sent],
                          [job.text_base + o for o in offsets[:count]])


# --- HTTP -------------------------------------------------------------------------------------------

def _coalesce(events: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Events that queued up while the client was being written to, merged into one per choice."""
  merged: dict[int, dict] = {}
  for index, event in events:
    if "error" in event:
      return [(index, event)]
    if index in merged:
      previous = merged[index]
      event = {**event, "text": previous["text"] + event["text"],
               "logprobs": scoring.merge_logprobs([previous.get("logprobs"), event.get("logprobs")])}
    merged[index] = event
  return list(merged.items())


def _error_body(status: int, param: str | None, message: str) -> web.Response:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                           status=status)


def _http_error(e: web.HTTPException, request: web.Request) -> web.Response:
  """404, 405, 413... in the JSON error shape of the 400s."""
  if isinstance(e, web.HTTPNotFound):
    return _error_body(404, "path", f"no route {request.method} {request.path}; routes: POST /v1/completions, "
                                    "POST /v1/chat/completions, GET /v1/models, GET /health")
  if isinstance(e, web.HTTPMethodNotAllowed):
    return _error_body(405, "method", f"{request.path} does not take {request.method}; it takes "
                                      f"{', '.join(sorted(e.allowed_methods))}")
  if isinstance(e, web.HTTPRequestEntityTooLarge):
    return _error_body(413, "body", f"the request body is over {MAX_BODY_BYTES} bytes; send a shorter prompt")
  return _error_body(e.status, None, e.reason)


@web.middleware
async def _errors_and_log(request: web.Request, handler):
  """Turns every error into the JSON error shape and logs each request in one line."""
  start = time.perf_counter()
  info = request[REQUEST_INFO] = {"id": f"cmpl-{uuid.uuid4().hex}", "prompt_tokens": 0, "new_tokens": 0}
  try:
    response = await handler(request)
  except RequestError as e:
    response = _error_body(e.status, e.param, str(e))
    info["error"] = e.param
  except web.HTTPException as e:
    response = _http_error(e, request)
  except Exception as e:  # a bug: the client gets a JSON 500 and the log keeps the traceback
    LOG.exception("%s failed", info["id"])
    response = _error_body(500, None, f"internal error: {type(e).__name__}")
  status = info.get("status", response.status)
  routine = request.path in ("/health", "/v1/models") and response.status < 400
  LOG.log(logging.DEBUG if routine else logging.INFO,
          "%s %s %s %s prompt_tokens=%d new_tokens=%d latency=%.3fs%s",
          info["id"], request.method, request.path, status, info["prompt_tokens"], info["new_tokens"],
          time.perf_counter() - start, f" param={info['error']}" if "error" in info else "")
  if not response.prepared:
    response.headers["X-Request-Id"] = info["id"]
  return response


def make_app(generator: scoring.ScoringGenerator, tokenizer, model_name: str, max_batch: int = 8,
             prefix: list[int] = (), stop_ids=()) -> web.Application:
  """The aiohttp application serving `generator` as `model_name`; `prefix` ids start every prompt."""
  engine = Engine(generator, tokenizer, max_batch, stop_ids)
  max_len = generator.cfg.max_len
  vocab_size = generator.cfg.vocab_size

  async def health(_):
    return web.json_response({"status": "ok", "batches": engine.batches})

  async def models(_):
    return web.json_response({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxlm",
                                                           "max_len": max_len}]})

  async def completions(request: web.Request):
    info = request[REQUEST_INFO]
    if request.content_type != "application/json":
      raise RequestError("Content-Type", f"the body must be JSON sent with 'Content-Type: application/json' "
                                         f"(got '{request.content_type}')", status=415)
    r = parse_request(await request.read(), tokenizer, max_len, list(prefix), vocab_size, model_name)
    info["prompt_tokens"] = len(r["ids"])
    events, loop = asyncio.Queue(), asyncio.get_running_loop()
    jobs = [Job(i, r["ids"], r["max_tokens"], {"temperature": r["temperature"], "top_k": r["top_k"],
                                                "top_p": r["top_p"], "seed": (r["seed"] + i) % 2 ** 32},
                r["stop"], events, loop, r["logprobs"], r["prompt"] if r["echo"] else None, len(prefix),
                len(r["prompt"])) for i in range(r["n"])]
    for job in jobs:
      engine.jobs.put(job)
    head = {"id": info["id"], "object": "text_completion", "created": int(time.time()), "model": model_name}
    try:
      return await (_stream(request, head, jobs, info) if r["stream"] else _collect(head, jobs, info))
    finally:
      for job in jobs:  # a client that left (or a failure) stops its rows at the next decode step
        job.cancelled = True

  app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_and_log])
  app.add_routes([web.get("/health", health), web.get("/v1/models", models), web.post("/v1/completions", completions)])
  app[ENGINE] = engine
  from jaxlm.inference import openai as serve_chat  # local: serve_chat builds on this module, which it is given (no import cycle)
  serve_chat.add_route(sys.modules[__name__], app, tokenizer, model_name, max_len, list(prefix), vocab_size)
  return app


async def _collect(head: dict, jobs: list[Job], info: dict) -> web.Response:
  """The non-streaming answer: every choice's text once all are finished."""
  texts, logprobs = [[] for _ in jobs], [[] for _ in jobs]
  finish = [None] * len(jobs)
  while None in finish:
    index, event = await jobs[0].events.get()
    if "error" in event:
      return _error_body(500, None, event["error"])
    texts[index].append(event["text"])
    logprobs[index].append(event.get("logprobs"))
    if "finish_reason" in event:
      finish[index] = event["finish_reason"]
      info["new_tokens"] += event["completion_tokens"]
  choices = [{"index": i, "text": "".join(texts[i]), "logprobs": scoring.merge_logprobs(logprobs[i]),
              "finish_reason": finish[i]} for i in range(len(jobs))]
  usage = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["new_tokens"],
           "total_tokens": info["prompt_tokens"] + info["new_tokens"]}
  return web.json_response({**head, "choices": choices, "usage": usage})


def sse_event(body: dict) -> bytes:
  """One server-sent event carrying `body` as JSON (the `stream: true` wire format)."""
  return f"data: {json.dumps(body)}\n\n".encode()


async def _stream(request: web.Request, head: dict, jobs: list[Job], info: dict) -> web.StreamResponse:
  """Server-sent events: one per choice for whatever text is final when the client is ready for more."""
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                         "X-Request-Id": info["id"]})
  try:
    await response.prepare(request)
    finished = 0
    while finished < len(jobs):
      pending = [await jobs[0].events.get()]
      while not jobs[0].events.empty():
        pending.append(jobs[0].events.get_nowait())
      for index, event in _coalesce(pending):
        if "error" in event:
          await response.write(sse_event({"error": {"message": event["error"], "type": "server_error"}}))
          finished = len(jobs)
          break
        choice = {"index": index, "text": event["text"], "logprobs": event.get("logprobs"),
                  "finish_reason": event.get("finish_reason")}
        await response.write(sse_event({**head, "choices": [choice]}))
        if "finish_reason" in event:
          finished += 1
          info["new_tokens"] += event["completion_tokens"]
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
  except ConnectionError:  # the client went away: one log line (the middleware's), no traceback
    info["status"] = "client-disconnected"
  return response


def app_for_run(workdir, step: int | None = None, int8: bool = False, max_batch: int = 8,
                mesh=None) -> web.Application:
  """The server app for a run directory (or an int8 one from `jaxlm quantize`), named after its folder;
  `mesh` (a `jax.sharding.Mesh`, None: one device) shards the params and the KV cache (see `jaxlm.inference.decode`)."""
  from jaxlm import config as config_lib, loader  # local: `jaxlm.inference.export` artifacts need no loader
  run = loader.load(workdir, step, mesh)
  params = quantize.quantize_params(run.params) if int8 and not quantize.is_quantized(run.params) else run.params
  model = run.config.model
  # A decoder continues its prompt (after the EOS that ends every training document), so the prompt is text
  # the model scores; an encoder-decoder's prompt is its source. The family's decoding adapter knows which.
  adapter = decode.adapter_for(model, run.tokenizer.bos_id)
  continues_prompt = adapter.prompt_in_cache
  prefix = adapter.prompt_ids(run.tokenizer, "")
  # All rows share the slot index, so the cache must hold the longest (bucketed) prompt of a batch plus its
  # largest max_tokens: twice the context covers any batch, with one cache shape for the server's life.
  cache_len = 2 * decode.round_up(model.max_len, decode.PROMPT_BUCKET)
  generator = scoring.ScoringGenerator(model, params, cache_len=cache_len, start_id=run.tokenizer.bos_id,
                               can_score_prompt=continues_prompt, mesh=mesh,
                               rules=config_lib.mesh_rules(run.config))
  from jaxlm.data import chat_template
  # EOS, and a chat template's end-of-turn token (e.g. <|im_end|>), as HF generation configs of chat models list.
  stop_ids = chat_template.for_tokenizer(run.tokenizer).stop_ids(run.tokenizer)
  return make_app(generator, run.tokenizer, fs.absolute(workdir).name, max_batch, prefix, stop_ids)


def serve(workdir, host: str = "127.0.0.1", port: int = 8000, step: int | None = None, int8: bool = False,
          max_batch: int = 8, mesh=None) -> None:
  """Serves a run until interrupted (on `mesh`, as `app_for_run`); logs one line per request to stderr."""
  if not LOG.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # one line per request, whatever handlers the root logger has
  # access_log=None: the middleware's line replaces aiohttp's access log.
  web.run_app(app_for_run(workdir, step, int8, max_batch, mesh), host=host, port=port, access_log=None,
              print=lambda msg: print(msg, flush=True))


class BackgroundServer:
  """Runs an app on host:port (0 picks a free port) in a thread with its own event loop; for tests and embedding."""

  def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
    self.loop = asyncio.new_event_loop()
    self.runner = web.AppRunner(app, access_log=None)
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
