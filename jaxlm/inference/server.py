"""An HTTP completion server: aiohttp in front, one decode thread behind, requests batched together.

Why aiohttp: one well-kept package gives both the asyncio server (with
server-sent-event streaming via `StreamResponse`) and the client the tests
use, with no ASGI layer between them. The decode loop is blocking JAX work,
so it runs in one worker thread: requests that arrive while a batch decodes
wait in a queue, and the worker takes up to `max_batch` of them as its next
batch. The batch is padded to `max_batch` rows and the cache is always
`model.max_len` long, so the decode step compiles once for the server's life.

API (the OpenAI completions API, legacy form, and its chat form; `jaxlm.inference.openai`):
  POST /v1/completions, POST /v1/chat/completions, GET /health, GET /v1/models
`n` decodes n rows (seeds seed, seed+1, ...); `logprobs` returns each token's
log-probability under the model (before temperature and filtering) and the
top-k alternatives; `echo` puts the prompt in front of the completion (with
its tokens' log-probabilities, a decoder-only model scoring its first token
after the EOS that starts every text). `model`, when given, must be the
served name. Every bad request gets a 4xx with {"error": {"message", "type",
"param", "code"}} naming the field: 404, 405, 408, 413 and 415 included, and
the 400 aiohttp itself gives malformed HTTP (`_Connection`). Each request is
logged in one line: id, status, prompt and new tokens, latency.

Slow or vanished clients hold nothing for long: a connection must deliver a
request's headers within `header_timeout` seconds of opening (or of its last
answer: the keep-alive idle limit, which aiohttp applies to a connection
waiting for its next request, whole or partial), and a request its body within
`body_timeout` seconds, else it gets a JSON 408 and the connection is closed.
A client that hangs up mid-body is one log line ('client-disconnected'), not an
error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid

import jax
from aiohttp import web, web_protocol, web_server

from jaxlm.data import chat_template
from jaxlm.errors import ConfigError
from jaxlm.inference import decode, openai
from jaxlm.inference import logprobs as scoring
from jaxlm.inference import text as text_lib
from jaxlm.models import quantize
from jaxlm.storage import fs

LOG = logging.getLogger("jaxlm.inference.server")
MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT_S = 15.0  # a connection's request headers must arrive within this (also its keep-alive idle limit)
BODY_TIMEOUT_S = 30.0  # a request's body (at most MAX_BODY_BYTES) must arrive within this

ENGINE = web.AppKey("engine", object)
BODY_TIMEOUT = web.AppKey("body_timeout", float)
REQUEST_INFO = web.RequestKey("info", dict)


# --- The decode worker ------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
  """One completion (one of a request's `n` choices), filled by the decode thread."""

  index: int
  ids: list[int]
  max_tokens: int
  sampling: dict
  output: text_lib.TextStream  # the completion's tokens and the text already sent
  events: asyncio.Queue  # shared by the request's choices: (index, event) pairs
  loop: asyncio.AbstractEventLoop
  logprobs: int | None = None
  echo_text: str | None = None  # the prompt, when `echo`
  prompt_start: int = 0  # ids[prompt_start:] are the prompt's own tokens (after the prefix)
  text_base: int = 0  # characters before the completion: completion text offsets start here
  scores: list[tuple] = dataclasses.field(default_factory=list)  # (logprob, top ids, top logprobs) per token
  scored_sent: int = 0  # tokens whose log-probabilities were already sent
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
    stream = self.generator.stream(
      [job.ids for job in batch], [job.max_tokens for job in batch], sampling, self.stop_ids, batch_size=self.max_batch
    )
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
        if out.emit_B[i] and scoring:
          job.scores.append((scores["logprob_B"][i], scores["top_ids_BxK"][i], scores["top_logprobs_BxK"][i]))
        reason = "stop" if out.stopped_B[i] else ("length" if out.finished_B[i] else None)
        self._emit(job, int(out.tokens_B[i]) if out.emit_B[i] else None, reason)
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
    ids = job.ids[job.prompt_start :]
    # Position j of prompt_* scores token j + 1 of the row (the first token has no context).
    positions = range(job.prompt_start - 1, len(job.ids) - 1)
    if "prompt_logprob_BxP" in scores:
      rows = [
        (
          scores["prompt_logprob_BxP"][row, j],
          scores["prompt_top_ids_BxPxK"][row, j],
          scores["prompt_top_logprobs_BxPxK"][row, j],
        )
        if j >= 0
        else (None, None, None)
        for j in positions
      ]
    else:  # the prompt was a source for an encoder: it has no log-probabilities of its own
      rows = [(None, None, None)] * len(ids)
    return self._logprobs(job, ids, rows, scoring.char_offsets(self.tokenizer, ids, 0, len(ids)))

  def _emit(self, job: Job, token: int | None, reason: str | None) -> None:
    """Adds `token` (None: none) and sends the completion text that is final (`jaxlm.inference.text`)."""
    output = job.output
    piece = output.push(token, last=reason is not None)
    if output.stopped:
      reason = "stop"
    if reason is None:
      if piece:
        job.put({"text": piece, "logprobs": self._completion_logprobs(job, output.sent)})
      return
    job.done = True
    logprobs = self._completion_logprobs(job, output.sent if output.stopped else None)
    job.put({"text": piece, "logprobs": logprobs, "finish_reason": reason, "completion_tokens": len(output.tokens)})

  def _completion_logprobs(self, job: Job, ready: int | None) -> dict | None:
    """Log-probabilities of the tokens not yet sent that begin before character `ready` of the completion
    (None: all of them)."""
    if job.logprobs is None:
      return None
    tokens = job.output.tokens
    offsets = scoring.char_offsets(self.tokenizer, tokens, job.scored_sent, len(tokens))
    count = len(offsets) if ready is None else sum(1 for o in offsets if o < ready)
    start, job.scored_sent = job.scored_sent, job.scored_sent + count
    return self._logprobs(
      job,
      tokens[start : job.scored_sent],
      job.scores[start : job.scored_sent],
      [job.text_base + o for o in offsets[:count]],
    )


# --- HTTP -------------------------------------------------------------------------------------------


def _http_error(e: web.HTTPException, request: web.Request) -> web.Response:
  """404, 405, 413... in the JSON error shape of the 400s."""
  if isinstance(e, web.HTTPNotFound):
    return openai.error_body(
      404,
      "path",
      f"no route {request.method} {request.path}; routes: POST /v1/completions, "
      "POST /v1/chat/completions, GET /v1/models, GET /health",
    )
  if isinstance(e, web.HTTPMethodNotAllowed):
    return openai.error_body(
      405, "method", f"{request.path} does not take {request.method}; it takes {', '.join(sorted(e.allowed_methods))}"
    )
  if isinstance(e, web.HTTPRequestEntityTooLarge):
    return openai.error_body(413, "body", f"the request body is over {MAX_BODY_BYTES} bytes; send a shorter prompt")
  return openai.error_body(e.status, None, e.reason)


@web.middleware
async def _errors_and_log(request: web.Request, handler):
  """Turns every error into the JSON error shape and logs each request in one line."""
  start = time.perf_counter()
  info = request[REQUEST_INFO] = {"id": f"cmpl-{uuid.uuid4().hex}", "prompt_tokens": 0, "new_tokens": 0}
  try:
    response = await handler(request)
  except openai.RequestError as e:
    response = openai.error_body(e.status, e.param, str(e))
    info["error"] = e.param
  except web.HTTPException as e:
    response = _http_error(e, request)
  except ConnectionError:  # the client hung up (mid-body, or before its answer): nothing to answer, no error
    info["status"] = "client-disconnected"
    response = web.Response(status=499)  # nginx's 'client closed request': nobody reads it, the log line says it
  except Exception as e:  # a bug: the client gets a JSON 500 and the log keeps the traceback
    LOG.exception("%s failed", info["id"])
    response = openai.error_body(500, None, f"internal error: {type(e).__name__}")
  status = info.get("status", response.status)
  routine = request.path in ("/health", "/v1/models") and response.status < 400
  LOG.log(
    logging.DEBUG if routine else logging.INFO,
    "%s %s %s %s prompt_tokens=%d new_tokens=%d latency=%.3fs%s",
    info["id"],
    request.method,
    request.path,
    status,
    info["prompt_tokens"],
    info["new_tokens"],
    time.perf_counter() - start,
    f" param={info['error']}" if "error" in info else "",
  )
  if not response.prepared:
    response.headers["X-Request-Id"] = info["id"]
  if info.get("close"):  # a body that never came: answer, then drop the connection rather than read on
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
  return response


async def _read_body(request: web.Request, info: dict) -> bytes:
  """The request's body, read within the app's body timeout; a 408 RequestError (and the connection marked for
  closing) when it does not arrive in time."""
  timeout = request.app[BODY_TIMEOUT]
  try:
    return await asyncio.wait_for(request.read(), timeout)
  except asyncio.TimeoutError:
    info["close"] = True
    size = f" (Content-Length {request.content_length})" if request.content_length is not None else ""
    raise openai.RequestError(
      "body", f"the request body{size} did not arrive within {timeout:g} s; send the whole body at once", 408
    ) from None


class _Connection(web_protocol.RequestHandler):
  """aiohttp's connection handler, answering the requests aiohttp refuses itself (malformed HTTP: a bad request
  line, header or chunk) in the API's JSON error shape, logged in one line instead of a traceback."""

  def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
    if request.writer.output_size > 0:  # an answer is under way: no second one can follow (aiohttp's rule)
      raise ConnectionError("the answer was already being sent")
    if status >= 500:
      LOG.error("request from %s failed: %s", request.remote, exc, exc_info=exc)
      response = openai.error_body(status, None, f"internal error: {type(exc).__name__}")
    else:
      # aiohttp's text is 'What is wrong:', a blank line, the offending bytes and a caret line under them.
      lines = [line.strip() for line in (message or str(exc) or "").splitlines() if line.strip(" ^")]
      reason = ": ".join([lines[0].rstrip(":"), *lines[1:2]])[:200] if lines else "unreadable request"
      LOG.info("malformed HTTP from %s %s: %s", request.remote, status, reason)
      response = openai.error_body(status, "http", f"malformed HTTP request: {reason}; send valid HTTP/1.1")
    response.force_close()
    return response


class _Server(web_server.Server):
  """aiohttp's connection factory, making `_Connection`s."""

  def __call__(self) -> _Connection:
    return _Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
  """`web.AppRunner` whose connections answer malformed HTTP in JSON (`_Connection`); no access log (the
  middleware logs each request)."""

  def __init__(self, app: web.Application, **kwargs):
    super().__init__(app, access_log=None, **kwargs)

  async def _make_server(self) -> web_server.Server:
    server = await super()._make_server()
    server.__class__ = _Server  # aiohttp builds its Server itself; only the connection class differs
    return server


def _check_timeouts(header_timeout: float, body_timeout: float) -> None:
  """ConfigError, one line naming the flag, for a timeout that is not a positive number of seconds."""
  for flag, seconds in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout)):
    if not seconds > 0:  # also refuses NaN
      raise ConfigError(f"{flag} {seconds}: must be a positive number of seconds")


def make_app(
  generator: scoring.ScoringGenerator,
  tokenizer,
  model_name: str,
  max_batch: int = 8,
  prefix: list[int] = (),
  stop_ids=(),
  header_timeout: float = HEADER_TIMEOUT_S,
  body_timeout: float = BODY_TIMEOUT_S,
) -> web.Application:
  """The aiohttp application serving `generator` as `model_name`.

  Args:
    generator: decodes the batches and scores their tokens.
    tokenizer: the run's tokenizer (its chat template renders chat requests).
    model_name: the name the API serves.
    max_batch: the most rows decoded together.
    prefix: ids that start every prompt.
    stop_ids: ids that end a completion.
    header_timeout: seconds a connection has to send a request's headers (from its opening or its last answer).
    body_timeout: seconds a request has to send its body.

  Returns:
    The application, its decode worker in `app[ENGINE]`.
  """
  _check_timeouts(header_timeout, body_timeout)
  engine = Engine(generator, tokenizer, max_batch, stop_ids)
  max_len = generator.cfg.max_len
  vocab_size = generator.cfg.vocab_size
  template = chat_template.for_tokenizer(tokenizer)

  async def health(_):
    return web.json_response({"status": "ok", "batches": engine.batches})

  async def models(_):
    return web.json_response(
      {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxlm", "max_len": max_len}]}
    )

  def route(endpoint: openai.Endpoint, parse):
    """The handler that answers requests `parse(body)` reads, in `endpoint`'s shapes."""

    async def handle(request: web.Request):
      info = request[REQUEST_INFO]
      if request.content_type != "application/json":
        raise openai.RequestError(
          "Content-Type",
          f"the body must be JSON sent with 'Content-Type: application/json' (got '{request.content_type}')",
          status=415,
        )
      r = parse(await _read_body(request, info))
      info["prompt_tokens"] = len(r["ids"])
      events, loop = asyncio.Queue(), asyncio.get_running_loop()
      jobs = [
        Job(
          i,
          r["ids"],
          r["max_tokens"],
          {"temperature": r["temperature"], "top_k": r["top_k"], "top_p": r["top_p"], "seed": (r["seed"] + i) % 2**32},
          text_lib.TextStream(tokenizer, r["stop"]),
          events,
          loop,
          r["logprobs"],
          r["prompt"] if r["echo"] else None,
          len(prefix),
          len(r["prompt"]),
        )
        for i in range(r["n"])
      ]
      for job in jobs:
        engine.jobs.put(job)
      head = {"id": info["id"], "created": int(time.time()), "model": model_name}
      try:
        if r["stream"]:
          return await openai.stream(request, endpoint, head, events, len(jobs), info)
        return await openai.collect(endpoint, head, events, len(jobs), info)
      finally:
        for job in jobs:  # a client that left (or a failure) stops its rows at the next decode step
          job.cancelled = True

    return handle

  completions = route(
    openai.COMPLETIONS,
    lambda body: openai.parse_completion_request(body, tokenizer, max_len, list(prefix), vocab_size, model_name),
  )
  chat_completions = route(
    openai.CHAT,
    lambda body: openai.parse_chat_request(body, tokenizer, template, max_len, list(prefix), vocab_size, model_name),
  )
  # aiohttp closes a connection still waiting for (the rest of) a request when its keep-alive timer fires, which
  # it also starts when the connection opens: that is the header timeout.
  app = web.Application(
    client_max_size=MAX_BODY_BYTES, middlewares=[_errors_and_log], handler_args={"keepalive_timeout": header_timeout}
  )
  app[BODY_TIMEOUT] = body_timeout
  app.add_routes(
    [
      web.get("/health", health),
      web.get("/v1/models", models),
      web.post("/v1/completions", completions),
      web.post("/v1/chat/completions", chat_completions),
    ]
  )
  app[ENGINE] = engine
  return app


def app_for_run(
  workdir, step: int | None = None, int8: bool = False, max_batch: int = 8, mesh=None, **timeouts
) -> web.Application:
  """The server app for a run directory (or an int8 one from `jaxlm quantize`), named after its folder;
  `mesh` (a `jax.sharding.Mesh`, None: one device) shards the params and the KV cache (see `jaxlm.inference.decode`);
  `timeouts`: `make_app`'s header_timeout and body_timeout."""
  from jaxlm import config as config_lib  # local: `jaxlm.inference.export` artifacts need no loader
  from jaxlm import loader

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
  generator = scoring.ScoringGenerator(
    model,
    params,
    cache_len=cache_len,
    start_id=run.tokenizer.bos_id,
    can_score_prompt=continues_prompt,
    mesh=mesh,
    rules=config_lib.mesh_rules(run.config),
  )
  # EOS, and a chat template's end-of-turn token (e.g. <|im_end|>), as HF generation configs of chat models list.
  stop_ids = chat_template.for_tokenizer(run.tokenizer).stop_ids(run.tokenizer)
  return make_app(generator, run.tokenizer, fs.absolute(workdir).name, max_batch, prefix, stop_ids, **timeouts)


def serve(
  workdir,
  host: str = "127.0.0.1",
  port: int = 8000,
  step: int | None = None,
  int8: bool = False,
  max_batch: int = 8,
  mesh=None,
  header_timeout: float = HEADER_TIMEOUT_S,
  body_timeout: float = BODY_TIMEOUT_S,
) -> None:
  """Serves a run until interrupted (on `mesh`, as `app_for_run`; timeouts as `make_app`); logs one line per
  request to stderr."""
  if not LOG.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # one line per request, whatever handlers the root logger has
  _check_timeouts(header_timeout, body_timeout)  # before the run loads
  app = app_for_run(workdir, step, int8, max_batch, mesh, header_timeout=header_timeout, body_timeout=body_timeout)

  async def run() -> None:
    runner = Runner(app)
    await runner.setup()
    try:
      await web.TCPSite(runner, host, port).start()
      print(f"======== Running on http://{host}:{port} ========\n(Press CTRL+C to quit)", flush=True)
      await asyncio.Event().wait()  # until interrupted
    finally:
      await runner.cleanup()

  try:
    asyncio.run(run())
  except KeyboardInterrupt:  # Ctrl-C is how a server stops, as with aiohttp's run_app
    pass


class BackgroundServer:
  """Runs an app on host:port (0 picks a free port) in a thread with its own event loop; for tests and embedding."""

  def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
    self.loop = asyncio.new_event_loop()
    self.runner = Runner(app)
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
