"""Chat templates: messages -> the text a model reads, as transformers' `apply_chat_template` renders it.

A run's template is its Hugging Face tokenizer's (`chat_template` in
tokenizer_config.json or chat_template.jinja), rendered with jinja2 in the
same sandbox transformers uses: `ImmutableSandboxedEnvironment` with
trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` that
does not escape HTML, `raise_exception`, `strftime_now`, and the tokenizer's
special tokens (bos_token, eos_token, ...) as variables. Templates come from
model repositories, so they are untrusted code: the sandbox is the point.

Runs without one (byte and SentencePiece tokenizers) use `DEFAULT_TEMPLATE`:

    <|system|>
    You are terse.<|end|>
    <|user|>
    Hi<|end|>
    <|assistant|>
    Hello.<|end|>

Each message is `<|ROLE|>`, a newline, the content and `<|end|>`, then a
newline; the generation prompt is `<|assistant|>` and a newline. The markers
are plain text, which every tokenizer can spell; `<|end|>` is where a turn
stops (`turn_end`).

Training needs to know which characters are the assistant's (the loss is on
those only). `ChatTemplate.segments` finds them without template markup: it
renders the conversation up to each assistant message with the generation
prompt and up to the end of that message without it; the difference is the
assistant's turn, end-of-turn marker included.
"""

from __future__ import annotations

import datetime
import json
from typing import Sequence

from jaxlm.config import ConfigError

DEFAULT_TEMPLATE = (
  "{% for message in messages %}"
  "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
  "{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant")
_PROBE = "\x00jaxlm-turn-end-probe\x00"


class ChatTemplateError(ConfigError):
  """A template that cannot render these messages, or that is not usable for training; the message says why
  (a ConfigError, so the CLI prints it as one line)."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
  import jinja2  # local: the module imports jinja2 only when a template is compiled

  raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str, name: str = "the chat template"):
  """A jinja2 `Template` for `source`, in transformers' sandboxed environment; `name` says where the template
  comes from in a ChatTemplateError."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  environment = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  environment.filters["tojson"] = _tojson
  environment.globals["raise_exception"] = _raise_exception
  environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return environment.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"{name} has a syntax error at line {e.lineno}: {e.message}") from None


class ChatTemplate:
  """A compiled chat template with the special tokens it may reference.

  source: the Jinja text; special_tokens: {'bos_token': '<s>', ...}, passed to the template as variables;
  name: where the template comes from (e.g. 'the chat template in RUN/hf_tokenizer/chat_template.jinja'), for
  errors.
  """

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "the chat template"):
    self.source, self.name = source, name
    self.special_tokens = dict(special_tokens or {})
    self.template = compile_template(source, name)
    self.turn_end = self._find_turn_end()

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The text of `messages` ([{'role', 'content'}, ...]); `add_generation_prompt` appends the assistant's cue."""
    import jinja2

    try:
      return self.template.render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        tools=None,
        documents=None,
        **self.special_tokens,
      )
    except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
      raise ChatTemplateError(f"{self.name} refused these messages: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - untrusted code may fail any way (1/0, None + 1, a bad index...)
      raise ChatTemplateError(f"{self.name} failed: {type(e).__name__}: {_one_line(e)}; fix the template") from None

  def _find_turn_end(self) -> str:
    """The text a template puts after an assistant message's content (e.g. '<|end|>', '<|im_end|>', '</s>'),
    stripped of whitespace; '' when it adds none or cannot render a probe conversation."""
    try:
      text = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}])
    except ChatTemplateError:
      return ""
    return text.split(_PROBE, 1)[1].strip() if _PROBE in text else ""

  def stop_ids(self, tokenizer) -> list[int]:
    """EOS, plus the end-of-turn marker when `tokenizer` spells it as one special token (e.g. <|im_end|>):
    decoding drops special tokens, so no stop string could see it."""
    ids = [int(tokenizer.eos_id)]
    if self.turn_end:
      marker = [int(i) for i in tokenizer.encode(self.turn_end)]
      if len(marker) == 1 and tokenizer.decode(marker) == "" and marker[0] not in ids:
        ids.append(marker[0])
    return ids

  def stop_strings(self, stop: list[str]) -> list[str]:
    """`stop` plus the end-of-turn marker, which ends the answer's text when it is written as text."""
    return stop + [self.turn_end] if self.turn_end and self.turn_end not in stop else list(stop)

  def segments(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, in order; their concatenation is
    `render(messages)`. Raises ChatTemplateError when a template renders an earlier part of the
    conversation differently once more messages follow (then no prefix marks the assistant's text)."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      prompt = self.render(messages[:i], add_generation_prompt=True)
      full = self.render(messages[: i + 1])
      if not (prompt.startswith(done) and full.startswith(prompt)):
        raise ChatTemplateError(
          "the chat template does not render conversations prefix by prefix (its text for "
          f"the first {i} messages changes when message {i + 1} follows), so the assistant's "
          "tokens cannot be located; use a template without lookahead"
        )
      pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
      done = full
    rest = self.render(messages)[len(done) :]
    return [(text, is_assistant) for text, is_assistant in pieces + [(rest, False)] if text]


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())[:300]


def for_tokenizer(tokenizer) -> ChatTemplate:
  """The template of `tokenizer` (a Hugging Face tokenizer's own, named by its file, else `DEFAULT_TEMPLATE`)."""
  source = getattr(tokenizer, "chat_template", None)
  if not source:
    return ChatTemplate(DEFAULT_TEMPLATE, getattr(tokenizer, "special_tokens", {}), "the default chat template")
  folder = getattr(tokenizer, "folder", None)
  name = "the tokenizer's chat template"
  if folder is not None:  # a Hugging Face tokenizer reads chat_template.jinja first, else tokenizer_config.json
    jinja = folder / "chat_template.jinja"
    name = f"the chat template in {jinja if jinja.is_file() else folder / 'tokenizer_config.json'}"
  return ChatTemplate(source, getattr(tokenizer, "special_tokens", {}), name)


def check_messages(messages, where: str) -> list[dict]:
  """`messages` as a list of {'role', 'content'} dicts; ValueError naming `where` and the bad field otherwise.

  `where` prefixes the message, e.g. 'data.jsonl, line 3' or "field 'messages'"."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  checked = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    extra = sorted(set(message) - {"role", "content", "name"})
    if extra:
      raise ValueError(f"{where}: messages[{i}] has unknown field '{extra[0]}'; allowed: role, content, name")
    if message.get("role") not in ROLES:
      raise ValueError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
    if not isinstance(message.get("content"), str):
      raise ValueError(f"{where}: messages[{i}].content must be a string")
    checked.append(dict(message))
  return checked
