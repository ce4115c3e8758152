"""An HTTP completion server: aiohttp in front, one decode thread behind, requests batched together.

Why aiohttp: one well-kept package gives both the asyncio server (with
server-sent-event streaming via `StreamResponse`) and the client the tests
use, with no ASGI layer between them. The decode loop is blocking JAX work,
so it runs in one worker thread (`jaxlm.inference.batching.Engine`): the
decode batch has `max_batch` slots, and a request that arrives while it
decodes joins at the next step as soon as a slot is free (continuous
batching; `batching_policy='static'` waits for the whole batch to finish).
The decode step compiles once for the server's life.

API (the OpenAI completions API, legacy form, and its chat form; `jaxlm.inference.openai`):
  POST /v1/completions, POST /v1/chat/completions, GET /health, GET /v1/models
`n` decodes n rows (seeds seed, seed+1, ...) of each prompt; `logprobs` returns each token's
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
import logging
import threading
import time
import uuid

from aiohttp import web, web_protocol, web_server

from jaxlm.data import chat_template
from jaxlm.errors import ConfigError
from jaxlm.inference import batching, decode, openai
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
  decoder: batching.SlotDecoder,
  tokenizer,
  model_name: str,
  prefix: list[int] = (),
  stop_ids=(),
  header_timeout: float = HEADER_TIMEOUT_S,
  body_timeout: float = BODY_TIMEOUT_S,
  batching_policy: str = "continuous",
) -> web.Application:
  """The aiohttp application serving `decoder` as `model_name`.

  Args:
    decoder: decodes the requests in its slots and scores their tokens (`batching.SlotDecoder`).
    tokenizer: the run's tokenizer (its chat template renders chat requests).
    model_name: the name the API serves.
    prefix: ids that start every text prompt.
    stop_ids: ids that end a completion.
    header_timeout: seconds a connection has to send a request's headers (from its opening or its last answer).
    body_timeout: seconds a request has to send its body.
    batching_policy: 'continuous' (requests join the decode batch between steps) or 'static' (a batch
      decodes to its end before the next starts), see `jaxlm.inference.batching`.

  Returns:
    The application, its decode worker in `app[ENGINE]`.
  """
  _check_timeouts(header_timeout, body_timeout)
  engine = batching.Engine(decoder, tokenizer, stop_ids, batching_policy)
  max_len = decoder.cfg.max_len
  vocab_size = decoder.cfg.vocab_size
  template = chat_template.for_tokenizer(tokenizer)

  async def health(_):
    return web.json_response({"status": "ok", "steps": engine.steps, "requests": engine.admitted})

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
      info["prompt_tokens"] = sum(len(prompt["ids"]) for prompt in r["prompts"])
      events, loop = asyncio.Queue(), asyncio.get_running_loop()
      keys = ("temperature", "top_k", "top_p", "presence_penalty", "frequency_penalty", "logit_bias")
      # OpenAI's order: the n choices of prompt 0, then of prompt 1...; choice i of a prompt samples with seed + i.
      jobs = [
        batching.Job(
          p * r["n"] + i,
          prompt["ids"],
          r["max_tokens"],
          {**{key: r[key] for key in keys}, "seed": (r["seed"] + i) % 2**32},
          text_lib.TextStream(tokenizer, r["stop"]),
          events,
          loop,
          r["logprobs"],
          prompt["text"] if r["echo"] else None,
          prompt["prompt_start"],
          len(prompt["text"]),  # completion offsets count from the prompt's start, echoed or not (OpenAI)
          chat_logprobs=endpoint is openai.CHAT,
        )
        for p, prompt in enumerate(r["prompts"])
        for i in range(r["n"])
      ]
      for job in jobs:
        engine.jobs.put(job)
      head = {"id": info["id"], "created": int(time.time()), "model": model_name}
      try:
        if r["stream"]:
          return await openai.stream(request, endpoint, head, events, len(jobs), info, r["include_usage"])
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
  workdir,
  step: int | None = None,
  int8: bool = False,
  max_batch: int = 8,
  mesh=None,
  batching_policy: str = "continuous",
  **timeouts,
) -> web.Application:
  """The server app for a run directory (or an int8 one from `jaxlm quantize`), named after its folder.

  Args:
    workdir: the run.
    step: the checkpoint step (None: the latest).
    int8: quantize the weights to int8.
    max_batch: the decode slots: the most requests decoded together.
    mesh: a `jax.sharding.Mesh` (None: one device) that shards the params and the KV cache (`jaxlm.inference.decode`).
    batching_policy: 'continuous' or 'static' (`make_app`).
    timeouts: `make_app`'s header_timeout and body_timeout.

  Returns:
    The application; it logs the run and the step it loaded.
  """
  from jaxlm import config as config_lib  # local: `jaxlm.inference.export` artifacts need no loader
  from jaxlm import loader

  if batching_policy not in batching.POLICIES:
    raise ConfigError(f"--batching {batching_policy}: must be one of {', '.join(batching.POLICIES)}")
  if max_batch < 1:
    raise ConfigError(f"--max-batch {max_batch}: must be at least 1")
  run = loader.load(workdir, step, mesh)
  params = quantize.quantize_params(run.params) if int8 and not quantize.is_quantized(run.params) else run.params
  model = run.config.model
  # A decoder continues its prompt (after the EOS that ends every training document), so the prompt is text
  # the model scores; an encoder-decoder's prompt is its source. The family's decoding adapter knows which.
  prefix = decode.adapter_for(model, run.tokenizer.bos_id).prompt_ids(run.tokenizer, "")
  decoder = batching.SlotDecoder(
    model, params, max_batch, run.tokenizer.bos_id, mesh=mesh, rules=config_lib.mesh_rules(run.config)
  )
  # EOS, and a chat template's end-of-turn token (e.g. <|im_end|>), as HF generation configs of chat models list.
  stop_ids = chat_template.for_tokenizer(run.tokenizer).stop_ids(run.tokenizer)
  name = fs.absolute(workdir).name
  LOG.info(
    "loaded run %s (%s) at step %d%s: %d decode slots, %s batching",
    name,
    fs.absolute(workdir),
    run.step,
    ", int8" if int8 or quantize.is_quantized(params) else "",
    max_batch,
    batching_policy,
  )
  return make_app(decoder, run.tokenizer, name, prefix, stop_ids, batching_policy=batching_policy, **timeouts)


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
  batching_policy: str = "continuous",
) -> None:
  """Serves a run until interrupted (as `app_for_run`; timeouts as `make_app`); logs the run and step it
  loaded, then one line per request, to stderr."""
  if not LOG.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # one line per request, whatever handlers the root logger has
  _check_timeouts(header_timeout, body_timeout)  # before the run loads
  app = app_for_run(
    workdir,
    step,
    int8,
    max_batch,
    mesh,
    batching_policy,
    header_timeout=header_timeout,
    body_timeout=body_timeout,
  )

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
