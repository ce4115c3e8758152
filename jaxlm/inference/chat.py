"""`jaxlm chat --workdir RUN`: a conversation in the terminal that keeps its history.

Each line typed is a user message. The whole conversation so far is
rendered with the run's chat template (`jaxlm.data.chat_template`) and the
assistant's cue, decoded from the start (no cache is kept between turns: a
turn's prefill is one call), and the answer streams to stdout as it is
produced, then joins the history. `/reset` starts over, `/exit` or end of
input (Ctrl-D) quits. When stdin is not a terminal (piped input) only the
answers are printed, each followed by a newline, so scripts can read them.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from jaxlm.data import chat_template as chat_template_lib
from jaxlm.inference import decode
from jaxlm.inference import text as text_lib


class ChatSession:
  """A conversation with a loaded run (`jaxlm.loader.Run`): `reply(text)` answers and remembers both turns.

  max_tokens: the most tokens per answer; sampling: `decode.Sampling` (default greedy); system: an optional
  system message that opens the conversation.
  """

  def __init__(self, run, max_tokens: int = 256, sampling: decode.Sampling | None = None, system: str = ""):
    self.tokenizer, self.model_cfg = run.tokenizer, run.config.model
    self.template = chat_template_lib.for_tokenizer(self.tokenizer)
    adapter = decode.adapter_for(self.model_cfg, self.tokenizer.bos_id)
    self.prefix = adapter.prompt_ids(self.tokenizer, "")
    self.generator = decode.Generator(self.model_cfg, run.params, start_id=self.tokenizer.bos_id)
    self.stop_ids = self.template.stop_ids(self.tokenizer)
    self.stop = self.template.stop_strings([])
    self.max_tokens, self.sampling = max_tokens, sampling or decode.Sampling()
    self.system = system
    self.messages: list[dict] = []
    self.reset()

  def reset(self) -> None:
    """Forgets the conversation (keeps the system message)."""
    self.messages = [{"role": "system", "content": self.system}] if self.system else []

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    """The ids the model continues for `messages`: the decoder's prefix and the rendered conversation."""
    text = self.template.render(messages, add_generation_prompt=True)
    return self.prefix + [int(i) for i in self.tokenizer.encode(text)]

  def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's answer to the user message `text`; `on_text` receives it in pieces as they become final.

    Raises DecodeError when the conversation no longer fits the model's context (then `reset`)."""
    messages = self.messages + [{"role": "user", "content": text}]
    ids = self.prompt_ids(messages)
    room = self.model_cfg.max_len - len(ids)
    if room < 1:
      raise decode.DecodeError(
        f"the conversation has {len(ids)} tokens, the model's context is "
        f"{self.model_cfg.max_len}; type /reset to start over"
      )
    answer = text_lib.TextStream(self.tokenizer, self.stop)
    for out in self.generator.stream([ids], min(self.max_tokens, room), self.sampling, self.stop_ids):
      finished = bool(out.finished_B[0])
      piece = answer.push(int(out.tokens_B[0]) if out.emit_B[0] else None, last=finished)
      if on_text and piece:
        on_text(piece)
      if answer.stopped or finished:
        break
    self.messages = messages + [{"role": "assistant", "content": answer.text}]
    return answer.text


def run_loop(
  session: ChatSession, lines: TextIO = sys.stdin, out: TextIO = sys.stdout, interactive: bool | None = None
) -> None:
  """Reads user messages from `lines` until /exit or end of input and writes the answers to `out`.

  `interactive` (default: whether `lines` is a terminal) adds the 'you> ' prompt and a banner on stderr."""
  interactive = lines.isatty() if interactive is None else interactive
  if interactive:
    print("jaxlm chat: type a message; /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
  while True:
    if interactive:
      print("you> ", end="", file=out, flush=True)
    line = lines.readline()
    if not line or line.strip() == "/exit":
      return
    text = line.rstrip("\n")
    if text.strip() == "/reset":
      session.reset()
      continue
    if not text.strip():
      continue
    try:
      session.reply(text, on_text=lambda piece: print(piece, end="", file=out, flush=True))
    except decode.DecodeError as e:
      print(f"jaxlm: {e}", file=sys.stderr)
      continue
    print(file=out, flush=True)
