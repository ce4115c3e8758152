"""`POST /v1/chat/completions` for `jaxlm serve`: OpenAI-style messages, rendered with the run's chat template.

    POST /v1/chat/completions {messages: [{role, content}, ...], max_tokens=16, temperature=0, top_p=1,
                               top_k=0, stop=null|str|[str], seed=0, stream=false, n=1, user, model}

The conversation is rendered with the template (`jaxlm.data.chat_template`:
the Hugging Face tokenizer's, else the default) and the assistant's cue, and
then goes through exactly the checks and the decode queue of
`/v1/completions` (`jaxlm.inference.server.parse_request`, `Engine`): the fields they
share are validated by the same code, and a bad conversation is a 400 naming
`messages`. Generation stops at EOS, at the template's end-of-turn marker
(`ChatTemplate.stop_ids` and `stop_strings`), or at the
request's `stop` strings. Answers have the chat shapes: `chat.completion`
with `choices[i].message`, or `chat.completion.chunk` events with `delta`.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from jaxlm.data import chat_template as chat_template_lib

NOT_FOR_CHAT = ("prompt", "echo", "logprobs")  # completion fields with no chat meaning here


def parse_chat_request(serve, body: bytes, tokenizer, template: chat_template_lib.ChatTemplate, max_len: int,
                       prefix: list[int], vocab_size: int, model_name: str = "") -> dict:
  """The validated chat request: `serve.parse_request`'s fields for the rendered conversation, plus 'messages'.

  `serve` is the `jaxlm.inference.server` module (see `add_route`). `serve.RequestError` names the bad field; problems with
  the rendered prompt (too long, bad text) name 'messages'."""
  chat_fields = sorted({"messages", *serve._FIELDS} - set(NOT_FOR_CHAT))
  try:
    request = json.loads(body, parse_constant=serve._reject_constant)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
    return serve.parse_request(body, tokenizer, max_len, prefix, vocab_size, model_name)  # its JSON errors
  if not isinstance(request, dict):
    raise serve.RequestError("body", "the request body must be a JSON object")
  for key in request:
    if key not in chat_fields:
      raise serve.RequestError(key, f"unknown field '{key}'; allowed: {', '.join(chat_fields)}")
  if "messages" not in request:
    raise serve.RequestError("messages", "field 'messages' is required: a list of {role, content} objects")
  try:
    messages = chat_template_lib.check_messages(request["messages"], "field 'messages'")
    prompt = template.render(messages, add_generation_prompt=True)
  except ValueError as e:  # check_messages and ChatTemplateError
    raise serve.RequestError("messages", str(e)) from None
  fields = {key: value for key, value in request.items() if key != "messages"}
  try:
    r = serve.parse_request(json.dumps({**fields, "prompt": prompt}).encode(), tokenizer, max_len, prefix,
                            vocab_size, model_name)
  except serve.RequestError as e:
    if e.param != "prompt":
      raise
    raise serve.RequestError("messages", f"the conversation, rendered with the chat template: "
                                         f"{str(e).replace('field ', '')}", e.status) from None
  return {**r, "messages": messages, "stop": template.stop_strings(r["stop"])}


def add_route(serve, app: web.Application, tokenizer, model_name: str, max_len: int, prefix: list[int],
              vocab_size: int) -> None:
  """Registers POST /v1/chat/completions on a `serve.make_app` application (its engine in `app[serve.ENGINE]`).

  `serve` is the `jaxlm.inference.server` module, passed in by `make_app` rather than imported here, so that the two
  modules do not import each other (jaxlm's imports form no cycle, tests/unit/test_imports.py)."""
  template = chat_template_lib.for_tokenizer(tokenizer)
  engine = app[serve.ENGINE]

  async def chat_completions(request: web.Request):
    info = request[serve.REQUEST_INFO]
    if request.content_type != "application/json":
      raise serve.RequestError("Content-Type", f"the body must be JSON sent with 'Content-Type: application/json' "
                                               f"(got '{request.content_type}')", status=415)
    r = parse_chat_request(serve, await request.read(), tokenizer, template, max_len, list(prefix), vocab_size,
                           model_name)
    info["prompt_tokens"] = len(r["ids"])
    events, loop = asyncio.Queue(), asyncio.get_running_loop()
    jobs = [serve.Job(i, r["ids"], r["max_tokens"], {"temperature": r["temperature"], "top_k": r["top_k"],
                                                      "top_p": r["top_p"], "seed": (r["seed"] + i) % 2 ** 32},
                      r["stop"], events, loop, prompt_start=len(prefix)) for i in range(r["n"])]
    for job in jobs:
      engine.jobs.put(job)
    head = {"id": info["id"], "created": int(time.time()), "model": model_name}
    try:
      return await (_stream(serve, request, head, jobs, info) if r["stream"] else _collect(serve, head, jobs, info))
    finally:
      for job in jobs:  # a client that left (or a failure) stops its rows at the next decode step
        job.cancelled = True

  app.router.add_post("/v1/chat/completions", chat_completions)


async def _collect(serve, head: dict, jobs: list, info: dict) -> web.Response:
  """The non-streaming answer: each choice's message once all are finished."""
  texts, finish = [[] for _ in jobs], [None] * len(jobs)
  while None in finish:
    index, event = await jobs[0].events.get()
    if "error" in event:
      return serve._error_body(500, None, event["error"])
    texts[index].append(event["text"])
    if "finish_reason" in event:
      finish[index] = event["finish_reason"]
      info["new_tokens"] += event["completion_tokens"]
  choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
              "finish_reason": finish[i]} for i in range(len(jobs))]
  usage = {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["new_tokens"],
           "total_tokens": info["prompt_tokens"] + info["new_tokens"]}
  return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage})


async def _stream(serve, request: web.Request, head: dict, jobs: list, info: dict) -> web.StreamResponse:
  """Server-sent `chat.completion.chunk` events: the role first, then content deltas, then the finish reason."""
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                         "X-Request-Id": info["id"]})

  def chunk(index: int, delta: dict, reason: str | None = None) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": reason}
    return serve.sse_event({**head, "object": "chat.completion.chunk", "choices": [choice]})

  try:
    await response.prepare(request)
    for job in jobs:
      await response.write(chunk(job.index, {"role": "assistant", "content": ""}))
    finished = 0
    while finished < len(jobs):
      pending = [await jobs[0].events.get()]
      while not jobs[0].events.empty():
        pending.append(jobs[0].events.get_nowait())
      for index, event in serve._coalesce(pending):
        if "error" in event:
          await response.write(serve.sse_event({"error": {"message": event["error"], "type": "server_error"}}))
          finished = len(jobs)
          break
        if event["text"]:
          await response.write(chunk(index, {"content": event["text"]}))
        if "finish_reason" in event:
          await response.write(chunk(index, {}, event["finish_reason"]))
          finished += 1
          info["new_tokens"] += event["completion_tokens"]
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
  except ConnectionError:  # the client went away: one log line (the middleware's), no traceback
    info["status"] = "client-disconnected"
  return response
