"""Generated token ids to text pieces that are final, for `jaxlm serve`, `jaxlm chat` and `jaxlm generate`.

A token can end inside a multi-byte UTF-8 character (the tokenizer decodes the
unfinished character as U+FFFD), and the text so far can end with the start of
a stop string that the next tokens complete. Neither may reach the reader
early, so `TextStream` decodes all the tokens each time and holds both back.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 character to


class TextStream:
  """The text of a growing list of token ids, handed out in pieces that no later token changes.

  Args:
    tokenizer: decodes a list of ids to text (`tokenizer.decode`).
    stop: strings that end the text; the text is cut before the first one found.

  Attributes:
    tokens: the ids added so far.
    text: their text so far, cut before a stop string.
    sent: the characters of text handed out so far.
    stopped: whether a stop string ended the text.
  """

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self.tokenizer, self.stop = tokenizer, list(stop)
    self.hold = max([len(s) - 1 for s in self.stop] + [0])  # what could be the start of a stop string
    self.tokens: list[int] = []
    self.text = ""
    self.sent = 0
    self.stopped = False

  def push(self, token: int | None = None, last: bool = False) -> str:
    """Adds `token` (None: none this step) and returns the text that became final since the last call.

    Args:
      token: the next generated id, or None.
      last: the stream ends here: returns all the rest of the text.

    Returns:
      The new piece ('' when nothing is final yet). Once a stop string is found, the rest before it
      (`stopped` is then true, and the stream is over).
    """
    if token is not None:
      self.tokens.append(int(token))
    text = self.tokenizer.decode(self.tokens)
    cut = min([text.index(s) for s in self.stop if s in text], default=None)
    if cut is not None:
      text, self.stopped, last = text[:cut], True, True
    self.text = text
    # Whole characters only, short of anything that could still become a stop string.
    ready = len(text) if last else len(text.rstrip(REPLACEMENT)) - self.hold
    if ready <= self.sent:
      return ""
    piece, self.sent = text[self.sent : ready], ready
    return piece
