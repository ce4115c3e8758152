"""The byte tokenizer: round trips, special ids, and ids past its vocabulary."""

import warnings

import pytest

from jaxlm.data import tokenizer as tokenizer_lib


def test_byte_round_trip_and_specials_dropped():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode("héllo\n")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "héllo\n"


def test_ids_past_the_vocabulary_are_skipped_with_one_warning(monkeypatch):
  monkeypatch.setattr(tokenizer_lib.ByteTokenizer, "_warned_out_of_range", False)
  tok = tokenizer_lib.ByteTokenizer()
  # 108, 109 are 'h', 'i' (bytes 104, 105 shifted by 4); 300 and 301 used to wrap into '(' and ')'.
  with pytest.warns(UserWarning, match="skipping ids above 259"):
    assert tok.decode([108, 109, 300, 301]) == "hi"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a second warning would raise here
    assert tok.decode([300, 108]) == "h"
