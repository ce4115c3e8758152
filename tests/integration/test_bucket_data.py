"""Prepared shards in a bucket (tests/gcs_emulator.py): `jaxlm prepare --out gs://`, and each process reading only
the blocks of its own rows, with the batches and the resume of local shards."""

import itertools
import os

import gcs_emulator
import jax
import numpy as np
import pytest
from support import REPO, error_line, files_config, run_in_process

from jaxlm.data import pipeline as data_lib
from jaxlm.data import prepare
from jaxlm.data import shards as prepared
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.storage import fs

BUCKET = "jaxlm-data-test"
SEQ, BATCH, STEPS = 32, 8, 3
BLOCK = 1024  # small blocks, so that a few rows of this 100 kB corpus are a small part of it


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.serving(BUCKET) as server:
    yield server


@pytest.fixture(scope="module")
def both(emulator, text_corpus, tmp_path_factory):
  """The test corpus prepared with 1 kB blocks into the bucket and into a local folder: (url, folder, config)."""
  local = tmp_path_factory.mktemp("local_shards")
  config = files_config(text_corpus)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(prepare, "BLOCK_BYTES", BLOCK)
    for out in (f"gs://{BUCKET}/prepared", local):
      prepare.prepare(config, out, workers=1, shard_mb=0.02, show_progress=False)
  return f"gs://{BUCKET}/prepared", local, config


def test_prepare_into_a_bucket_writes_the_local_bytes_and_nothing_local(emulator, both, tmp_path, monkeypatch):
  url, local, _ = both
  names = emulator.list_objects(BUCKET, "prepared/")
  expected = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
  assert names == [f"prepared/{name}" for name in expected] and len(expected) > 8
  for name in expected:
    assert fs.read_bytes(f"{url}/{name}") == (local / name).read_bytes(), name
  # The command from a scratch folder: no local `gs:` folder, and a rerun finds everything done.
  monkeypatch.chdir(tmp_path)
  args = ["prepare", "--config", str(REPO / "configs" / "tiny.py"), "--out", f"{url}-cli", "--workers", "1"]
  args += ["--config.data.source=files", f"--config.data.paths={both[2].data.paths}", "--config.data.val_fraction=0.2"]
  assert main_status(args) == 0
  assert list(tmp_path.iterdir()) == []
  assert fs.path(f"{url}-cli/train/index.json").exists() and fs.path(f"{url}-cli/validation/index.json").exists()


def test_prepare_into_a_missing_bucket_is_one_line(emulator, text_corpus, capfd):
  args = ["prepare", "--config", str(REPO / "configs" / "tiny.py"), "--out", "gs://no-such-bucket/x", "--workers", "1"]
  result = run_in_process([*args, "--config.data.source=files", f"--config.data.paths={text_corpus}/*.txt"], capfd)
  assert result.returncode == 2 and "gs://no-such-bucket: bucket not found" in error_line(result)


def main_status(args):
  from jaxlm.cli import main

  return main.main(args)


def local_batches(rows, start, steps, process, count=2):
  """The batches of process `process` of `count` (jax.process_index/count as they would be there)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "process_index", lambda: process)
    patch.setattr(jax, "process_count", lambda: count)
    return [b["inputs"] for b in itertools.islice(data_lib.train_batches(rows, BATCH, 0, start, steps), steps - start)]


def test_each_process_reads_only_the_blocks_of_its_rows_and_resumes_exactly(both):
  url, local, _ = both
  whole = local_batches(prepared.open_split(local / "train", ByteTokenizer(), SEQ), 0, STEPS, 0, 1)
  shard_bytes = sum(os.path.getsize(p) for p in (local / "train").glob("*.tokens.npy"))
  # Read once per shard opened: its .npy header (128 bytes) and its block checksums.
  per_shard = 128 + max(os.path.getsize(p) for p in (local / "train").glob("*.checksums.npy"))
  halves = []
  for process in (0, 1):
    rows = prepared.open_split(f"{url}/train", ByteTokenizer(), SEQ)  # a fresh reader: one process's
    halves.append(local_batches(rows, 0, STEPS, process))
    # 12 rows of 66 bytes: at most 2 blocks each, plus what each shard opened reads once.
    assert 0 < rows.bytes_read <= 12 * 2 * BLOCK + len(rows.shards) * per_shard < shard_bytes / 2
    resumed = local_batches(prepared.open_split(f"{url}/train", ByteTokenizer(), SEQ), 1, STEPS, process)
    for a, b in zip(halves[-1][1:], resumed, strict=True):
      np.testing.assert_array_equal(a, b)  # the data position is the step
  for step in range(STEPS):
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), whole[step])


def test_damaged_shards_in_a_bucket_are_one_line_naming_the_file(both, tmp_path, capfd):
  url, _, _ = both
  names = [os.path.basename(name) for name in fs.glob(f"{url}/train/shard_*.tokens.npy")]
  originals = {name: fs.read_bytes(f"{url}/train/{name}") for name in names}
  damaged = bytearray(originals["shard_00001.tokens.npy"])
  damaged[200] ^= 1  # another valid byte id
  try:
    fs.write_bytes(f"{url}/train/shard_00001.tokens.npy", bytes(damaged))
    rows = prepared.open_split(f"{url}/train", ByteTokenizer(), SEQ)
    with pytest.raises(prepared.PreparedDataError, match="shard_00001.tokens.npy.*do not match their checksum"):
      rows.tokens(0, int(rows.offsets[-1]))
    for name, data in originals.items():  # every shard cut short: the first read of the run fails
      fs.write_bytes(f"{url}/train/{name}", data[:-10])
    args = ["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run")]
    args += ["--config.data.source=prepared", f"--config.data.prepared_dir={url}", "--config.train.num_steps=2"]
    result = run_in_process(args, capfd)
  finally:
    for name, data in originals.items():
      fs.write_bytes(f"{url}/train/{name}", data)
  line = error_line(result)
  assert result.returncode == 2 and ".tokens.npy' has" in line and "cut short" in line, line


def test_a_tfds_split_prepared_into_a_bucket_gives_the_in_memory_rows():
  import tensorflow_datasets as tfds
  from support import tiny_config

  from jaxlm.training import trainer

  config = tiny_config()
  config.data.source, config.data.tfds_name, config.data.max_examples = "tfds", "tiny_shakespeare", 30
  with tfds.testing.mock_data(num_examples=40):
    prepare.prepare(config, f"gs://{BUCKET}/tfds", splits=("train",), workers=1, show_progress=False)
    expected = trainer.prepare_data(config, ByteTokenizer(), "train")
  rows = prepared.open_split(f"gs://{BUCKET}/tfds/train", ByteTokenizer(), config.data.seq_len)
  assert len(rows) == len(expected) > 0
  for i in range(len(rows)):
    for key, value in expected[i].items():
      np.testing.assert_array_equal(rows[i][key], value)
