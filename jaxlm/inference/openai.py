"""The OpenAI protocol of `jaxlm serve`: requests, answers and server-sent events of both endpoints.

    POST /v1/completions {prompt, max_tokens=16, temperature=0, top_p=1, top_k=0, stop=null|str|[str],
                          seed=0, stream=false, n=1, logprobs=null|0..5, echo=false, user, model}
    POST /v1/chat/completions {messages: [{role, content}, ...], and the same fields but prompt, echo
                               and logprobs}

A chat conversation is rendered with the run's template (`jaxlm.data.chat_template`:
the Hugging Face tokenizer's, else the default) and the assistant's cue, and then
goes through exactly the checks of a completion request: the fields they share
are validated by the same code, and a bad conversation is a 400 naming
`messages`. Chat generation also stops at the template's end-of-turn marker
(`ChatTemplate.stop_strings`). Both endpoints answer through one `collect` (the
whole answer) and one `stream` (server-sent events); an `Endpoint` gives each
its shapes: `text_completion` choices with `text`, or `chat.completion` choices
with `message` and `chat.completion.chunk` events with `delta`.

The transport (the decode queue, routes, middleware) is `jaxlm.inference.server`;
this module only reads the queue of (choice index, event) pairs it fills.
"""

from __future__ import annotations

import asyncio
import json
import math

from aiohttp import web

from jaxlm.data import chat_template as chat_template_lib
from jaxlm.inference import logprobs as scoring

MAX_CHOICES = 16  # the most completions `n` may ask for

_NUMBER = (int, float)
COMPLETION_FIELDS = {
  "prompt": (str,),
  "max_tokens": (int,),
  "temperature": _NUMBER,
  "top_p": _NUMBER,
  "top_k": (int,),
  "stop": (str, list, type(None)),
  "seed": (int,),
  "stream": (bool,),
  "n": (int,),
  "logprobs": (int, type(None)),
  "echo": (bool,),
  "user": (str,),
  "model": (str,),
}
"""Each field of a completion request and the JSON types it takes."""
_BOOLEANS = {"stream", "echo"}
NOT_FOR_CHAT = ("prompt", "echo", "logprobs")  # completion fields with no chat meaning here
CHAT_FIELDS = sorted({"messages", *COMPLETION_FIELDS} - set(NOT_FOR_CHAT))
"""The fields a chat request may have."""


class RequestError(ValueError):
  """A bad request: the HTTP status, the field (`param`) at fault and a message that says the fix.

  Args:
    param: the field at fault (or 'body', 'Content-Type'...), None when no one field is.
    message: what is wrong and how to fix it.
    status: the HTTP status of the answer.
  """

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
    raise RequestError(
      field,
      f"field '{field}' contains an unpaired surrogate ({text[e.start]!r} at "
      f"character {e.start}); send valid Unicode text",
    ) from None


def parse_completion_request(
  body: bytes, tokenizer, max_len: int, prefix: list[int], vocab_size: int, model_name: str = ""
) -> dict:
  """The validated fields of a completion request (with defaults) and the prompt's ids.

  Args:
    body: the request body.
    tokenizer: encodes the prompt.
    max_len: the model's context, which the prompt and `max_tokens` must fit.
    prefix: ids that start every prompt.
    vocab_size: the bound of `top_k`.
    model_name: when given, the only `model` accepted.

  Returns:
    Every field (defaults filled in), `stop` as a list, and `ids`: `prefix` + the encoded prompt.

  Raises:
    RequestError: naming the bad field.
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
    if key not in COMPLETION_FIELDS:
      raise RequestError(key, f"unknown field '{key}'; allowed: {', '.join(sorted(COMPLETION_FIELDS))}")
    # bool is an int in Python; only the boolean fields may be one.
    if not isinstance(value, COMPLETION_FIELDS[key]) or (
      isinstance(value, bool) != (key in _BOOLEANS) and value is not None
    ):
      raise RequestError(key, f"field '{key}' has the wrong type ({type(value).__name__})")
  r = {
    "max_tokens": 16,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "stop": None,
    "seed": 0,
    "stream": False,
    "n": 1,
    "logprobs": None,
    "echo": False,
    **request,
  }
  if model_name and "model" in request and request["model"] != model_name:
    raise RequestError(
      "model",
      f"model '{request['model']}' is not served here; this server serves '{model_name}' (GET /v1/models)",
      status=404,
    )
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
  if not 0 <= r["seed"] < 2**32:
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
    raise RequestError(
      "max_tokens",
      f"field 'max_tokens' must be in [1, {max_len - len(ids)}] for this prompt ({len(ids)} tokens, context {max_len})",
    )
  return {**r, "stop": stop, "ids": ids}


def parse_chat_request(
  body: bytes,
  tokenizer,
  template: chat_template_lib.ChatTemplate,
  max_len: int,
  prefix: list[int],
  vocab_size: int,
  model_name: str = "",
) -> dict:
  """The validated fields of a chat request: those of its rendered conversation as a completion request.

  Args:
    body: the request body.
    template: renders the conversation.
    tokenizer, max_len, prefix, vocab_size, model_name: as `parse_completion_request`.

  Returns:
    `parse_completion_request`'s fields for the rendered conversation, the template's stop strings added
    to `stop`, and 'messages'.

  Raises:
    RequestError: naming the bad field; problems with the rendered prompt (too long, bad text) name 'messages'.
  """
  try:
    request = json.loads(body, parse_constant=_reject_constant)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
    return parse_completion_request(body, tokenizer, max_len, prefix, vocab_size, model_name)  # its JSON errors
  if not isinstance(request, dict):
    raise RequestError("body", "the request body must be a JSON object")
  for key in request:
    if key not in CHAT_FIELDS:
      raise RequestError(key, f"unknown field '{key}'; allowed: {', '.join(CHAT_FIELDS)}")
  if "messages" not in request:
    raise RequestError("messages", "field 'messages' is required: a list of {role, content} objects")
  try:
    messages = chat_template_lib.check_messages(request["messages"], "field 'messages'")
    prompt = template.render(messages, add_generation_prompt=True)
  except ValueError as e:  # check_messages and ChatTemplateError
    raise RequestError("messages", str(e)) from None
  fields = {key: value for key, value in request.items() if key != "messages"}
  try:
    r = parse_completion_request(
      json.dumps({**fields, "prompt": prompt}).encode(), tokenizer, max_len, prefix, vocab_size, model_name
    )
  except RequestError as e:
    if e.param != "prompt":
      raise
    raise RequestError(
      "messages", f"the conversation, rendered with the chat template: {str(e).replace('field ', '')}", e.status
    ) from None
  return {**r, "messages": messages, "stop": template.stop_strings(r["stop"])}


# --- Answers ----------------------------------------------------------------------------------------


def error_body(status: int, param: str | None, message: str) -> web.Response:
  """The JSON error answer: {"error": {"message", "type", "param", "code"}}.

  Args:
    status: the HTTP status (and `code`); 5xx are server errors, the rest bad requests.
    param: the field at fault, or None.
    message: what is wrong and how to fix it.

  Returns:
    The response.
  """
  kind = "invalid_request_error" if status < 500 else "server_error"
  return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}}, status=status)


def sse_event(body: dict) -> bytes:
  """One server-sent event carrying `body` as JSON (the `stream: true` wire format).

  Args:
    body: the event's JSON object.

  Returns:
    The event's bytes.
  """
  return f"data: {json.dumps(body)}\n\n".encode()


class Endpoint:
  """The answer shapes of `/v1/completions`; `CHAT` overrides them for `/v1/chat/completions`.

  The events `collect` and `stream` read are dicts with the new 'text' of one choice, its 'logprobs' (or
  None) and, in the last event of the choice, 'finish_reason' and 'completion_tokens'.
  """

  def envelope(self, head: dict, chunk: bool) -> dict:
    """The fields around the choices.

    Args:
      head: {'id', 'created', 'model'}.
      chunk: for a streamed event rather than the whole answer.

    Returns:
      `head` with the object type.
    """
    return {"id": head["id"], "object": "text_completion", **head}

  def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str) -> dict:
    """One choice of the whole answer.

    Args:
      index: the choice's index.
      text: all of its text.
      logprobs: its logprobs object, or None.
      finish_reason: 'stop' or 'length'.

    Returns:
      The choice object.
    """
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

  def opening(self, index: int) -> list[dict]:
    """The choices streamed for choice `index` before any text.

    Args:
      index: the choice's index.

    Returns:
      Choice objects, one per event (none here).
    """
    return []

  def chunks(self, index: int, event: dict) -> list[dict]:
    """The choices streamed for one event of choice `index`.

    Args:
      index: the choice's index.
      event: its new text, logprobs and (when finished) finish reason.

    Returns:
      Choice objects, one per event.
    """
    return [
      {
        "index": index,
        "text": event["text"],
        "logprobs": event.get("logprobs"),
        "finish_reason": event.get("finish_reason"),
      }
    ]


class ChatEndpoint(Endpoint):
  """The answer shapes of `/v1/chat/completions`: messages, and deltas after the assistant's role."""

  def envelope(self, head: dict, chunk: bool) -> dict:
    """See `Endpoint.envelope`."""
    return {**head, "object": "chat.completion.chunk" if chunk else "chat.completion"}

  def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str) -> dict:
    """See `Endpoint.choice`; a chat choice carries no logprobs."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}

  def opening(self, index: int) -> list[dict]:
    """See `Endpoint.opening`: the assistant's role."""
    return [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]

  def chunks(self, index: int, event: dict) -> list[dict]:
    """See `Endpoint.chunks`: a content delta (when there is new text), then the finish reason in its own."""
    out = []
    if event["text"]:
      out.append({"index": index, "delta": {"content": event["text"]}, "finish_reason": None})
    if "finish_reason" in event:
      out.append({"index": index, "delta": {}, "finish_reason": event["finish_reason"]})
    return out


COMPLETIONS, CHAT = Endpoint(), ChatEndpoint()


def coalesce(events: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Events that queued up while the client was being written to, merged into one per choice.

  Args:
    events: (choice index, event) pairs in the order they came.

  Returns:
    One (index, event) pair per choice, or only the first error.
  """
  merged: dict[int, dict] = {}
  for index, event in events:
    if "error" in event:
      return [(index, event)]
    if index in merged:
      previous = merged[index]
      event = {
        **event,
        "text": previous["text"] + event["text"],
        "logprobs": scoring.merge_logprobs([previous.get("logprobs"), event.get("logprobs")]),
      }
    merged[index] = event
  return list(merged.items())


def _usage(info: dict) -> dict:
  return {
    "prompt_tokens": info["prompt_tokens"],
    "completion_tokens": info["new_tokens"],
    "total_tokens": info["prompt_tokens"] + info["new_tokens"],
  }


async def collect(endpoint: Endpoint, head: dict, events: asyncio.Queue, count: int, info: dict) -> web.Response:
  """The non-streaming answer: every choice once all are finished.

  Args:
    endpoint: the answer shapes.
    head: {'id', 'created', 'model'}.
    events: the queue of (choice index, event) pairs the decoder fills.
    count: the number of choices.
    info: the request's log fields; 'new_tokens' is added to.

  Returns:
    The JSON answer (a 500 when decoding failed).
  """
  texts, logprobs = [[] for _ in range(count)], [[] for _ in range(count)]
  finish = [None] * count
  while None in finish:
    index, event = await events.get()
    if "error" in event:
      return error_body(500, None, event["error"])
    texts[index].append(event["text"])
    logprobs[index].append(event.get("logprobs"))
    if "finish_reason" in event:
      finish[index] = event["finish_reason"]
      info["new_tokens"] += event["completion_tokens"]
  choices = [
    endpoint.choice(i, "".join(texts[i]), scoring.merge_logprobs(logprobs[i]), finish[i]) for i in range(count)
  ]
  return web.json_response({**endpoint.envelope(head, chunk=False), "choices": choices, "usage": _usage(info)})


async def stream(
  request: web.Request, endpoint: Endpoint, head: dict, events: asyncio.Queue, count: int, info: dict
) -> web.StreamResponse:
  """Server-sent events: each choice's text that is final when the client is ready for more, then [DONE].

  Args:
    request: the request answered.
    endpoint, head, events, count, info: as `collect`.

  Returns:
    The streamed response (info['status'] is 'client-disconnected' when the client went away).
  """
  response = web.StreamResponse(
    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": info["id"]}
  )

  def chunk(choice: dict) -> bytes:
    return sse_event({**endpoint.envelope(head, chunk=True), "choices": [choice]})

  try:
    await response.prepare(request)
    for index in range(count):
      for choice in endpoint.opening(index):
        await response.write(chunk(choice))
    finished = 0
    while finished < count:
      pending = [await events.get()]
      while not events.empty():
        pending.append(events.get_nowait())
      for index, event in coalesce(pending):
        if "error" in event:
          await response.write(sse_event({"error": {"message": event["error"], "type": "server_error"}}))
          finished = count
          break
        for choice in endpoint.chunks(index, event):
          await response.write(chunk(choice))
        if "finish_reason" in event:
          finished += 1
          info["new_tokens"] += event["completion_tokens"]
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
  except ConnectionError:  # the client went away: one log line (the middleware's), no traceback
    info["status"] = "client-disconnected"
  return response
