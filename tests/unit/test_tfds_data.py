"""TFDS sources (tfds_data.py) through tfds.testing.mock_data: no TensorFlow, no download."""

import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm.data import tfds_data
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.tasks import seq2seq
from jaxlm.training import trainer


def tfds_config(name, family="decoder", **data):
  c = tiny_config(family=family)
  c.data.source, c.data.tfds_name = "tfds", name
  for key, value in data.items():
    c.data[key] = value
  return c


@pytest.mark.parametrize("name,eval_split", [("lm1b", "test"), ("tiny_shakespeare", "validation")])
def test_language_model_rows_from_mocked_tfds(name, eval_split):
  c = tfds_config(name, tfds_eval_split=eval_split)
  config_lib.validate(c, 8)
  with tfds.testing.mock_data(num_examples=20):
    rows = trainer.prepare_data(c, ByteTokenizer(), "validation")
    documents = tfds_data.load_documents(c.data, "train")
  assert len(documents) == 20 and all(isinstance(d, bytes) for d in documents)
  assert len(rows) > 0 and rows[0]["inputs"].shape == (c.data.seq_len,)


@pytest.mark.parametrize("name", ["wmt14_translate/de-en", "wmt17_translate/de-en"])
def test_translation_pairs_from_mocked_tfds(name):
  c = tfds_config(name, family="encoder_decoder", source_key="en", target_key="de", max_examples=7)
  config_lib.validate(c, 8)
  with tfds.testing.mock_data(num_examples=10):
    pairs = seq2seq.load_pairs(c, "train")
    rows = trainer.prepare_data(c, ByteTokenizer(), "train")
  assert len(pairs) == 7 and all(isinstance(s, str) and isinstance(t, str) for s, t in pairs)
  assert rows[0]["inputs"].shape == (c.data.seq_len,) and rows[0]["input_segment_ids"].max() >= 1


def test_bytes_features_decode_like_str():
  assert tfds_data.as_text(b"caf\xc3\xa9") == tfds_data.as_text("café") == "café"


def test_unknown_feature_is_a_config_error():
  c = tfds_config("lm1b", text_key="body")
  with tfds.testing.mock_data(num_examples=3), pytest.raises(config_lib.ConfigError, match="data.text_key"):
    tfds_data.load_documents(c.data, "train")


def test_missing_data_is_a_one_line_config_error_without_download(tmp_path):
  c = tfds_config("tiny_shakespeare", tfds_data_dir=str(tmp_path / "absent"))
  with pytest.raises(config_lib.ConfigError, match="data.tfds_data_dir.*tfds build tiny_shakespeare"):
    config_lib.validate(c, 8)
  c.data.tfds_data_dir = str(tmp_path)  # exists, but nothing is prepared there
  with pytest.raises(config_lib.ConfigError) as error:
    tfds_data.load_documents(c.data, "train")
  assert "--file_format=array_record" in str(error.value) and "\n" not in str(error.value)
  assert not any(tmp_path.rglob("*.array_record*"))  # nothing was downloaded or prepared


def test_prepared_tfds_split_gives_the_in_memory_rows(tmp_path):
  from jaxlm.data import prepare
  from jaxlm.data import shards as prepared

  c = tfds_config("tiny_shakespeare", max_examples=30)
  with tfds.testing.mock_data(num_examples=40):
    prepare.prepare(c, tmp_path, splits=("train",), workers=1, show_progress=False)
    expected = trainer.prepare_data(c, ByteTokenizer(), "train")
  assert prepared.read_index(tmp_path / "train")["num_documents"] == 30
  rows = prepared.open_split(tmp_path / "train", ByteTokenizer(), c.data.seq_len)
  assert len(rows) == len(expected) > 0
  for i in range(len(rows)):
    for key, value in expected[i].items():
      np.testing.assert_array_equal(rows[i][key], value)


def test_a_large_split_read_into_memory_warns_and_names_prepare(monkeypatch):
  c = tfds_config("lm1b")
  monkeypatch.setattr(tfds_data, "LARGE_SPLIT", 5)
  with (
    tfds.testing.mock_data(num_examples=6),
    pytest.warns(UserWarning, match="jaxlm prepare --config.data.source=tfds"),
  ):
    assert len(tfds_data.load_documents(c.data, "train")) == 6
  c.data.max_examples = 5
  with tfds.testing.mock_data(num_examples=6), warnings.catch_warnings():
    warnings.simplefilter("error")
    assert len(tfds_data.load_documents(c.data, "train")) == 5
