"""The OpenAI protocol of `jaxlm serve`: requests, answers and server-sent events of both endpoints.

    POST /v1/completions {prompt: str|[str]|[ids]|[[ids]], max_tokens|max_completion_tokens=16, temperature=0,
                          top_p=1, top_k=0, presence_penalty=0, frequency_penalty=0, logit_bias={id: -100..100},
                          stop=null|str|[str], seed=0, stream=false, stream_options={include_usage}, n=1,
                          best_of=n, logprobs=null|0..5, echo=false, suffix="", response_format={type: text},
                          user, model}
    POST /v1/chat/completions {messages: [{role, content}, ...], logprobs=false, top_logprobs=0..20, and the
                               same fields but prompt, echo, best_of and suffix}

Field semantics follow vLLM's OpenAI server: null is the default, penalties count the generated tokens,
`max_completion_tokens` wins over `max_tokens`, a list prompt gives each prompt `n` choices indexed
prompt-major (choice i*n + j), token-id prompts are taken as they are (no EOS prefix). What jaxlm cannot do
is a 400 naming the field: `best_of` other than `n`, a non-empty `suffix`, a JSON `response_format`.

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
CHAT_TOP_LOGPROBS = 20  # the most alternatives chat's `top_logprobs` may ask for, as in the OpenAI API

_NUMBER = (int, float)
COMPLETION_FIELDS = {
  "prompt": (str, list),
  "max_tokens": (int,),
  "max_completion_tokens": (int,),
  "temperature": _NUMBER,
  "top_p": _NUMBER,
  "top_k": (int,),
  "presence_penalty": _NUMBER,
  "frequency_penalty": _NUMBER,
  "logit_bias": (dict,),
  "stop": (str, list),
  "seed": (int,),
  "stream": (bool,),
  "stream_options": (dict,),
  "n": (int,),
  "best_of": (int,),
  "logprobs": (int,),
  "echo": (bool,),
  "suffix": (str,),
  "response_format": (dict,),
  "user": (str,),
  "model": (str,),
}
"""Each field of a completion request and the JSON types it takes (null: as if the field were absent)."""
NOT_FOR_CHAT = ("prompt", "echo", "logprobs", "suffix", "best_of")  # completion fields with no chat meaning here
CHAT_ONLY = {"messages": (list,), "logprobs": (bool,), "top_logprobs": (int,)}
"""The fields of a chat request besides the completion fields it shares (chat's `logprobs` is a switch)."""
MAX_ROWS = 64  # the most completions one request may ask for: prompts times `n`
PENALTY_BOUND = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as in the OpenAI API
BIAS_BOUND = 100.0  # logit_bias values lie in [-100, 100]


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


def _load(body: bytes) -> dict:
  """The request's JSON object, its null fields dropped (null means the default, as in the OpenAI API)."""
  try:
    request = json.loads(body, parse_constant=_reject_constant)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError("body", f"the request body is not valid JSON: {e}") from None
  except RecursionError:
    raise RequestError("body", "the request body nests too deeply; send a flat JSON object") from None
  if not isinstance(request, dict):
    raise RequestError("body", "the request body must be a JSON object")
  return {key: value for key, value in request.items() if value is not None}


def _check_types(request: dict, fields: dict) -> None:
  for key, value in request.items():
    if key not in fields:
      raise RequestError(key, f"unknown field '{key}'; allowed: {', '.join(sorted(fields))}")
    # bool is an int in Python; only the boolean fields may be one.
    if not isinstance(value, fields[key]) or isinstance(value, bool) != (fields[key] == (bool,)):
      raise RequestError(key, f"field '{key}' has the wrong type ({type(value).__name__})")


def _prompts(prompt, tokenizer, prefix: list[int], vocab_size: int) -> list[dict]:
  """The prompts of `prompt` (a string, a list of strings, a list of token ids or a list of such lists), each
  {'ids', 'text', 'prompt_start'}: text is encoded after `prefix`; token ids are taken as they are."""
  usage = "a non-empty string, a list of them, a list of token ids or a list of lists of token ids"
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise RequestError("prompt", f"field 'prompt' is required and must be {usage}")
  out = []
  for p in prompt:
    if isinstance(p, str) and p:
      _check_text("prompt", p)
      ids = [int(i) for i in tokenizer.encode(p)]
      out.append({"ids": prefix + ids, "text": p, "prompt_start": len(prefix)})
    elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
      if not all(0 <= i < vocab_size for i in p):
        raise RequestError("prompt", f"field 'prompt' has a token id outside [0, {vocab_size}) (the vocabulary)")
      out.append({"ids": list(p), "text": tokenizer.decode(p), "prompt_start": 0})
    else:
      raise RequestError("prompt", f"field 'prompt' must be {usage}")
  return out


def _logit_bias(bias: dict, vocab_size: int) -> dict[int, float]:
  out = {}
  for key, value in bias.items():
    if not (key.isdigit() and int(key) < vocab_size):
      raise RequestError("logit_bias", f"field 'logit_bias' has key '{key}'; keys are token ids in [0, {vocab_size})")
    if isinstance(value, bool) or not isinstance(value, _NUMBER) or not -BIAS_BOUND <= value <= BIAS_BOUND:
      raise RequestError(
        "logit_bias", f"field 'logit_bias' maps '{key}' to {value!r}; values are numbers in [-100, 100]"
      )
    out[int(key)] = float(value)
  return out


def _refuse_unsupported(r: dict) -> None:
  """400 naming the field for what jaxlm cannot do; neutral values pass."""
  if "best_of" in r and r["best_of"] != r["n"]:
    raise RequestError(
      "best_of",
      f"field 'best_of' ({r['best_of']}) must equal n ({r['n']}): jaxlm returns every completion it decodes, "
      "it does not rank extra ones; leave best_of out",
    )
  if r.get("suffix"):
    raise RequestError("suffix", "field 'suffix' is not supported (no fill-in-the-middle); send an empty one or none")
  response_format = r.get("response_format", {"type": "text"})
  if response_format.get("type") != "text" or set(response_format) != {"type"}:
    raise RequestError(
      "response_format",
      f"field 'response_format' {json.dumps(response_format)[:100]} is not supported: jaxlm does not constrain "
      'decoding to JSON; send {"type": "text"} or none',
    )
  options = r.get("stream_options")
  if options is not None:
    if not r["stream"]:
      raise RequestError("stream_options", "field 'stream_options' is only for 'stream': true")
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
      raise RequestError("stream_options", "field 'stream_options' takes {\"include_usage\": true|false} only")


def parse_completion_request(
  body: bytes, tokenizer, max_len: int, prefix: list[int], vocab_size: int, model_name: str = ""
) -> dict:
  """The validated fields of a completion request (with defaults) and the prompts' ids.

  Args:
    body: the request body.
    tokenizer: encodes the prompt.
    max_len: the model's context, which each prompt and `max_tokens` must fit.
    prefix: ids that start every text prompt.
    vocab_size: the bound of `top_k`, token ids and `logit_bias` keys.
    model_name: when given, the only `model` accepted.

  Returns:
    Every field (defaults filled in), `stop` as a list, `max_tokens` (or `max_completion_tokens`),
    `logit_bias` as {id: bias}, `include_usage`, and `prompts`: one {'ids', 'text', 'prompt_start'} per prompt
    (`ids` starts with `prefix` for a text prompt).

  Raises:
    RequestError: naming the bad field.
  """
  request = _load(body)
  _check_types(request, COMPLETION_FIELDS)
  r = {
    "max_tokens": 16,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "stop": [],
    "seed": 0,
    "stream": False,
    "n": 1,
    "logprobs": None,
    "echo": False,
    **request,
  }
  if "max_completion_tokens" in r:  # the newer name wins, as in vLLM
    r["max_tokens"] = r["max_completion_tokens"]
  max_field = "max_completion_tokens" if "max_completion_tokens" in r else "max_tokens"
  if model_name and "model" in request and request["model"] != model_name:
    raise RequestError(
      "model",
      f"model '{request['model']}' is not served here; this server serves '{model_name}' (GET /v1/models)",
      status=404,
    )
  prompts = _prompts(r.get("prompt"), tokenizer, prefix, vocab_size)
  for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
    if not math.isfinite(r[key]):
      raise RequestError(key, f"field '{key}' must be a finite number")
  if r["temperature"] < 0:
    raise RequestError("temperature", "field 'temperature' must be >= 0")
  if not 0 < r["top_p"] <= 1:
    raise RequestError("top_p", "field 'top_p' must be in (0, 1]")
  if not 0 <= r["top_k"] <= vocab_size:
    raise RequestError("top_k", f"field 'top_k' must be in [0, {vocab_size}] (the vocabulary; 0 turns it off)")
  for key in ("presence_penalty", "frequency_penalty"):
    if not -PENALTY_BOUND <= r[key] <= PENALTY_BOUND:
      raise RequestError(key, f"field '{key}' must be in [-2, 2]")
  if not 0 <= r["seed"] < 2**32:
    raise RequestError("seed", "field 'seed' must be in [0, 2^32)")
  if not 1 <= r["n"] <= MAX_CHOICES:
    raise RequestError("n", f"field 'n' must be in [1, {MAX_CHOICES}]")
  if len(prompts) * r["n"] > MAX_ROWS:
    raise RequestError("prompt", f"{len(prompts)} prompts times n={r['n']} is over {MAX_ROWS} completions")
  if r["logprobs"] is not None and not 0 <= r["logprobs"] <= scoring.TOP_LOGPROBS:
    raise RequestError("logprobs", f"field 'logprobs' must be null or in [0, {scoring.TOP_LOGPROBS}]")
  _refuse_unsupported(r)
  stop = [r["stop"]] if isinstance(r["stop"], str) else r["stop"]
  if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
    raise RequestError("stop", "field 'stop' must be a non-empty string or a list of at most 4 of them")
  for s in stop:
    _check_text("stop", s)
  for prompt in prompts:
    ids = prompt["ids"]
    if len(ids) >= max_len:
      raise RequestError("prompt", f"the prompt has {len(ids)} tokens; the model's context is {max_len}")
    if not 1 <= r["max_tokens"] <= max_len - len(ids):
      raise RequestError(
        max_field,
        f"field '{max_field}' must be in [1, {max_len - len(ids)}] for this prompt ({len(ids)} tokens, "
        f"context {max_len})",
      )
  include_usage = r.get("stream_options", {}).get("include_usage", False)
  logit_bias = _logit_bias(r["logit_bias"], vocab_size)
  return {**r, "stop": stop, "prompts": prompts, "logit_bias": logit_bias, "include_usage": include_usage}


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
    to `stop`, 'messages', and `logprobs` the number of alternatives per token (`top_logprobs`, None when
    `logprobs` is not true).

  Raises:
    RequestError: naming the bad field; problems with the rendered prompt (too long, bad text) name 'messages'.
  """
  request = _load(body)
  fields = {**{k: v for k, v in COMPLETION_FIELDS.items() if k not in NOT_FOR_CHAT}, **CHAT_ONLY}
  _check_types(request, fields)
  if "messages" not in request:
    raise RequestError("messages", "field 'messages' is required: a list of {role, content} objects")
  top = request.get("top_logprobs", 0)
  if not 0 <= top <= CHAT_TOP_LOGPROBS:
    raise RequestError("top_logprobs", f"field 'top_logprobs' must be in [0, {CHAT_TOP_LOGPROBS}]")
  if top and not request.get("logprobs"):
    raise RequestError("top_logprobs", "field 'top_logprobs' needs 'logprobs': true")
  try:
    messages = chat_template_lib.check_messages(request["messages"], "field 'messages'")
    prompt = template.render(messages, add_generation_prompt=True)
  except ValueError as e:  # check_messages and ChatTemplateError
    raise RequestError("messages", str(e)) from None
  shared = {key: value for key, value in request.items() if key not in CHAT_ONLY}
  try:
    r = parse_completion_request(
      json.dumps({**shared, "prompt": prompt}).encode(), tokenizer, max_len, prefix, vocab_size, model_name
    )
  except RequestError as e:
    if e.param != "prompt":
      raise
    raise RequestError(
      "messages", f"the conversation, rendered with the chat template: {str(e).replace('field ', '')}", e.status
    ) from None
  logprobs = top if request.get("logprobs") else None
  return {**r, "messages": messages, "stop": template.stop_strings(r["stop"]), "logprobs": logprobs}


def token_bytes(tokenizer, token: int) -> list[int]:
  """A token's UTF-8 bytes, for chat logprobs: a byte tokenizer's lone byte as itself, a special id's name.

  Args:
    tokenizer: the run's tokenizer.
    token: the id.

  Returns:
    The bytes as a list of ints.
  """
  offset = getattr(tokenizer, "offset", None)  # the byte tokenizer: one id per byte
  text = scoring.token_text(tokenizer, token)
  if offset is not None and text.startswith("bytes:"):
    return [token - offset]
  return list(text.encode("utf-8"))


def chat_logprobs(tokenizer, ids: list[int], scores: list[tuple], top: int) -> dict:
  """OpenAI's chat logprobs object {'content': [{token, logprob, bytes, top_logprobs}, ...]} for `ids`.

  Args:
    tokenizer: the run's tokenizer.
    ids: the tokens.
    scores: (logprob, top ids, top logprobs) per token.
    top: alternatives per token.

  Returns:
    The object (its 'content' lists of several chunks concatenate: `scoring.merge_logprobs`).
  """

  def entry(token, logprob) -> dict:
    return {
      "token": scoring.token_text(tokenizer, token),
      "logprob": float(logprob),
      "bytes": token_bytes(tokenizer, token),
    }

  return {
    "content": [
      {**entry(token, logprob), "top_logprobs": [entry(int(i), lp) for i, lp in zip(top_ids[:top], top_logprobs[:top])]}
      for token, (logprob, top_ids, top_logprobs) in zip(ids, scores)
    ]
  }


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
    """See `Endpoint.choice`; `logprobs` in the chat shape (`chat_logprobs`)."""
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

  def opening(self, index: int) -> list[dict]:
    """See `Endpoint.opening`: the assistant's role."""
    return [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]

  def chunks(self, index: int, event: dict) -> list[dict]:
    """See `Endpoint.chunks`: a content delta (when there is new text), then the finish reason in its own."""
    out = []
    if event["text"] or event.get("logprobs"):
      delta = {"index": index, "delta": {"content": event["text"]}, "finish_reason": None}
      out.append({**delta, "logprobs": event["logprobs"]} if event.get("logprobs") else delta)
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
  request: web.Request,
  endpoint: Endpoint,
  head: dict,
  events: asyncio.Queue,
  count: int,
  info: dict,
  include_usage: bool = False,
) -> web.StreamResponse:
  """Server-sent events: each choice's text that is final when the client is ready for more, then [DONE].

  Args:
    request: the request answered.
    endpoint, head, events, count, info: as `collect`.
    include_usage: a last event before [DONE] with no choices and the usage (`stream_options`).

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
    if include_usage:
      await response.write(sse_event({**endpoint.envelope(head, chunk=True), "choices": [], "usage": _usage(info)}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
  except ConnectionError:  # the client went away: one log line (the middleware's), no traceback
    info["status"] = "client-disconnected"
  return response
