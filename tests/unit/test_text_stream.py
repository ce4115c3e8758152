"""`jaxlm.inference.text.TextStream`: pieces that no later token changes."""

from jaxlm.inference import text


class BytesTokenizer:
  """Each id is one byte; a cut-off UTF-8 character decodes to U+FFFD, as byte-level tokenizers do."""

  def decode(self, ids):
    return bytes(ids).decode("utf-8", errors="replace")


def pieces(stream, data: bytes):
  return [stream.push(byte) for byte in data]


def test_a_multibyte_character_split_across_tokens_waits_for_its_last_byte():
  stream = text.TextStream(BytesTokenizer())
  assert pieces(stream, "aé€".encode()) == ["a", "", "é", "", "", "€"]
  assert stream.push(last=True) == "" and stream.text == "aé€" and not stream.stopped


def test_a_stop_string_split_across_pieces_is_held_back_then_dropped():
  stream = text.TextStream(BytesTokenizer(), ["END"])
  assert pieces(stream, b"abcEN") == ["", "", "a", "b", "c"]  # 'EN' could start 'END'
  assert stream.push(ord("D")) == "" and stream.stopped and stream.text == "abc"


def test_a_held_back_prefix_that_is_no_stop_string_is_sent():
  stream = text.TextStream(BytesTokenizer(), ["END"])
  assert "".join(pieces(stream, b"xENx")) == "xE" and not stream.stopped
  assert stream.push(last=True) == "Nx" and stream.text == "xENx"


def test_the_earliest_stop_string_cuts_and_the_rest_comes_at_once():
  stream = text.TextStream(BytesTokenizer(), ["zz", "q"])
  assert stream.push(ord("a")) == ""  # 'a' is held: one character of hold for 'zz'
  assert stream.push(ord("q")) == "a" and stream.stopped and stream.sent == 1
  stream = text.TextStream(BytesTokenizer(), ["bc", "abcd"])
  assert "".join(pieces(stream, b"xabc")) == "xa" and stream.text == "xa"


def test_end_of_stream_flushes_the_rest_even_an_unfinished_character():
  stream = text.TextStream(BytesTokenizer(), ["STOP"])
  assert "".join(pieces(stream, b"hello STO")) == "hello "
  assert stream.push(last=True) == "STO" and stream.sent == len("hello STO")
  stream = text.TextStream(BytesTokenizer())
  assert pieces(stream, "é".encode()[:1]) == [""]
  assert stream.push(last=True) == "\ufffd"
