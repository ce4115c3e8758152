"""Data: corpus splits, packing with segment ids, exact and portable batch order."""

import itertools

import numpy as np
import pytest
from support import REPO, files_config, run_in_process

from jaxlm.config import ConfigError
from jaxlm.data import corpus
from jaxlm.data import pipeline as data_lib
from jaxlm.data.tokenizer import ByteTokenizer


def stream(docs):
  return data_lib.TokenStream.from_documents(docs, ByteTokenizer())


def test_stdlib_corpus_is_deterministic_and_split_by_file():
  train = corpus.stdlib_split("train", 0.03)
  validation = corpus.stdlib_split("validation", 0.03)
  assert train == corpus.stdlib_split("train", 0.03)
  assert validation and len(train) > 20 * len(validation)
  assert not set(train) & set(validation)
  assert not any("site-packages" in p.parts for p in train)


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
  path = tmp_path / "latin1.py"
  path.write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
  text = corpus.read_text_bytes(path)
  assert text.decode("utf-8").startswith("x = 'caf")


def test_rows_cover_every_token_once_with_segments_and_positions():
  docs = [b"abcdefg", b"hij", b"klmnopqrstuvwxyz"]
  rows = data_lib.PackedRows(stream(docs), seq_len=8)
  tokens = stream(docs).tokens
  assert len(rows) == (len(tokens) - 1) // 8
  targets = np.concatenate([rows[i]["targets"] for i in range(len(rows))])
  np.testing.assert_array_equal(targets, tokens[1 : 1 + 8 * len(rows)])
  row = rows[1]  # tokens 8..16: "hij<eos>klmn" begins inside document 2
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 3])
  # The target after "hij<eos>" is the next document's first byte: not predictable, weight 0.
  np.testing.assert_array_equal(row["weights"], [1, 1, 1, 0, 1, 1, 1, 1])


def batches(rows, start, steps, seed=0, threads=0):
  return [
    b["inputs"] for b in itertools.islice(data_lib.train_batches(rows, 4, seed, start, start + steps, threads), steps)
  ]


def test_resume_at_any_step_gives_the_same_batches():
  rows = data_lib.PackedRows(stream([bytes(range(40, 120)) * 3] * 5), seq_len=16)
  full = batches(rows, 0, 12)
  for start in (3, 7):
    resumed = batches(rows, start, 12 - start)
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(full, batches(rows, 0, 12, threads=2)):  # reader threads do not change the order
    np.testing.assert_array_equal(a, b)


def test_each_epoch_has_a_new_permutation():
  rows = data_lib.PackedRows(stream([bytes(range(40, 200))] * 4), seq_len=16)
  per_epoch = len(rows) // 4
  order = np.stack(batches(rows, 0, 2 * per_epoch))
  first, second = order[:per_epoch], order[per_epoch:]
  assert not np.array_equal(first, second)
  assert sorted(map(bytes, first.reshape(-1, 16))) == sorted(map(bytes, second.reshape(-1, 16)))


def test_processes_take_contiguous_slices_of_the_global_batch():
  assert list(data_lib.local_rows(3, 8, 0, 2)) == [24, 25, 26, 27]
  assert list(data_lib.local_rows(3, 8, 1, 2)) == [28, 29, 30, 31]


def test_eval_batches_pad_the_last_batch_with_zero_weight():
  rows = data_lib.PackedRows(stream([b"x" * 50]), seq_len=8)  # 6 rows
  out = list(data_lib.eval_batches(rows, 4))
  assert len(out) == 2
  assert out[1]["weights"][2:].sum() == 0 and out[1]["weights"][:2].sum() > 0


def test_files_source_splits_a_directory(text_corpus):
  cfg = files_config(text_corpus)
  train = data_lib.load_documents(cfg.data, "train")
  validation = data_lib.load_documents(cfg.data, "validation")
  assert train and validation and not set(train) & set(validation)


def test_one_file_is_cut_so_no_training_byte_is_validated(tmp_path):
  # One file never hashes into validation; before the fix, training read the whole file
  # while validation was its tail, so evaluation scored training data.
  path = tmp_path / "one.txt"
  text = bytes(range(32, 127)) * 200
  path.write_bytes(text)
  cfg = files_config(tmp_path)
  cfg.data.paths = str(path)
  cfg.data.val_fraction = 0.1
  train = b"".join(data_lib.load_documents(cfg.data, "train"))
  validation = b"".join(data_lib.load_documents(cfg.data, "validation"))
  assert train + validation == text
  assert len(validation) == len(text) - int(len(text) * 0.9)


def test_split_does_not_depend_on_how_the_path_is_spelled(text_corpus, monkeypatch):
  spellings = [str(text_corpus / "*.txt"), f"{text_corpus}/./*.txt"]
  monkeypatch.chdir(text_corpus.parent)
  spellings += [f"{text_corpus.name}/*.txt", f"./{text_corpus.name}/*.txt"]
  splits = []
  for pattern in spellings:
    cfg = files_config(text_corpus)
    cfg.data.paths = pattern
    splits.append(data_lib.load_documents(cfg.data, "validation"))
  assert splits[0] and all(split == splits[0] for split in splits)


def test_explicit_validation_paths_are_left_out_of_training(text_corpus):
  cfg = files_config(text_corpus)
  cfg.data.validation_paths = str(text_corpus / "doc0[0-2].txt")
  validation = data_lib.load_documents(cfg.data, "validation")
  train = data_lib.load_documents(cfg.data, "train")
  held_out = [corpus.read_text_bytes(text_corpus / f"doc0{i}.txt") for i in range(3)]
  assert validation == held_out
  assert len(train) == len(list(text_corpus.glob("*.txt"))) - 3
  assert not set(train) & set(held_out)


def test_a_lone_empty_training_file_is_one_line(tmp_path, capfd):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  result = run_in_process(
    [
      "train",
      "--config",
      str(REPO / "configs" / "tiny.py"),
      "--workdir",
      str(tmp_path / "run"),
      "--config.data.source=files",
      f"--config.data.paths={empty}",
    ],
    capfd,
  )
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("jaxlm: error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr  # (libtpu, when installed, logs its own lines)
  assert "data.paths" in errors[0] and "empty" in errors[0]


def test_too_little_text_for_a_batch_is_a_config_error(tmp_path):
  (tmp_path / "short.txt").write_text("x = 1\n" * 20)  # 120 bytes: 3 rows of 32, fewer than a batch of 8
  cfg = files_config(tmp_path)
  with pytest.raises(ConfigError, match="the train split .* has 3 rows .* fewer than the 8 needed"):
    data_lib.decoder_rows(cfg, ByteTokenizer(), "train")
