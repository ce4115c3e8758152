"""`jaxlm prepare` and the prepared readers: same rows as in memory, resumable, identical bytes, mixtures."""

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from support import REPO, error_line, files_config, run_cli, run_in_process, xla_flags

from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.data import corpus, mixture, prepare, spm
from jaxlm.data import pipeline as data_lib
from jaxlm.data import shards as prepared
from jaxlm.data.tokenizer import ByteTokenizer, SentencePieceTokenizer

SEQ = 32
SENTENCES = [
  f"Return the {w} of the {v} in line {i}."
  for i in range(200)
  for w, v in [("length", "list"), ("sum", "values"), ("name", "module")]
]


def prepare_files(text_corpus, out, workers=1, shard_mb=0.01, **data):
  """Prepares the tiny corpus (files source) into `out` with shards of about 10 kB; returns the config."""
  cfg = files_config(text_corpus)
  for key, value in data.items():
    cfg.data[key] = value
  prepare.prepare(cfg, out, workers=workers, shard_mb=shard_mb, show_progress=False)
  return cfg


def in_memory_rows(cfg, split):
  documents = data_lib.load_documents(cfg.data, split)
  return data_lib.PackedRows(data_lib.TokenStream.from_documents(documents, ByteTokenizer()), SEQ)


def assert_same_rows(expected, actual):
  assert len(actual) == len(expected) > 0
  for i in range(len(expected)):
    for key, value in expected[i].items():
      np.testing.assert_array_equal(actual[i][key], value, err_msg=f"row {i} {key}")


def folder_bytes(directory):
  return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared_corpus(text_corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared")
  return out, prepare_files(text_corpus, out)


def test_prepared_rows_equal_the_in_memory_rows(prepared_corpus):
  out, cfg = prepared_corpus
  for split in ("train", "validation"):
    assert_same_rows(in_memory_rows(cfg, split), prepared.open_split(out / split, ByteTokenizer(), SEQ))
  # Evaluation's compression baselines read the prepared validation text back.
  as_prepared = cfg.copy_and_resolve_references()
  as_prepared.data.source, as_prepared.data.prepared_dir = "prepared", str(out)
  assert data_lib.load_documents(as_prepared.data, "validation") == data_lib.load_documents(cfg.data, "validation")
  index = json.loads((out / "train" / "index.json").read_text())
  assert len(index["shards"]) > 3  # rows really cross shard boundaries
  ends = np.concatenate(
    [
      np.load(out / "train" / s["documents"]) + offset
      for s, offset in zip(index["shards"], np.cumsum([0] + [s["num_tokens"] for s in index["shards"]]))
    ]
  )
  assert len(ends) == index["num_documents"] == len(data_lib.load_documents(cfg.data, "train"))


def test_large_files_and_jsonl_lines_are_cut_into_shards_without_changing_tokens(tmp_path):
  big = tmp_path / "src" / "big.txt"
  big.parent.mkdir()
  big.write_bytes(b"".join(b"line %d of a long document\n" % i for i in range(3000)))  # about 80 kB
  lines = tmp_path / "src" / "docs.jsonl"
  lines.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * (i % 50)}) + "\n" for i in range(900)))
  cfg = files_config(tmp_path / "src")
  cfg.data.paths = f"{big},{lines}"
  cfg.data.validation_paths = str(lines)
  prepare.prepare(cfg, tmp_path / "out", workers=1, shard_mb=0.01, show_progress=False)
  for split in ("train", "validation"):
    rows = prepared.open_split(tmp_path / "out" / split, ByteTokenizer(), SEQ)
    assert len(json.loads((tmp_path / "out" / split / "index.json").read_text())["shards"]) > 1
    assert_same_rows(in_memory_rows(cfg, split), rows)
  assert len(data_lib.load_documents(cfg.data, "validation")) == 900


def test_prepare_twice_gives_identical_bytes_with_any_worker_count(prepared_corpus, text_corpus, tmp_path):
  out, _ = prepared_corpus
  prepare_files(text_corpus, tmp_path / "two", workers=2)
  assert folder_bytes(tmp_path / "two") == folder_bytes(out)
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*")}
  prepare_files(text_corpus, tmp_path / "two", workers=2)  # already prepared: nothing is rewritten
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*")} == before


def test_interrupted_prepare_resumes_and_never_leaves_a_shard_that_looks_complete(
  prepared_corpus, text_corpus, tmp_path, monkeypatch
):
  out, _ = prepared_corpus
  written = []
  original = prepare.write_shard

  def dies_at_the_fourth_shard(job):
    if len(written) == 3:
      # Killed mid-shard: a half-written tokens file, under its temporary name only.
      (tmp_path / "train" / "shard_00003.tokens.npy.tmp").write_bytes(b"\x93NUMPY partial")
      raise KeyboardInterrupt
    written.append(job[1])
    return original(job)

  monkeypatch.setattr(prepare, "write_shard", dies_at_the_fourth_shard)
  with pytest.raises(KeyboardInterrupt):
    prepare_files(text_corpus, tmp_path)
  train = tmp_path / "train"
  assert not (train / "index.json").exists()  # readers refuse the split
  with pytest.raises(config_lib.ConfigError, match="index.json is missing"):
    prepared.open_split(train, ByteTokenizer(), SEQ)
  assert sorted(p.name for p in train.glob("shard_*.json")) == [f"shard_{i:05d}.json" for i in range(3)]
  # A kill between the renames leaves tokens without the shard's marker; it must be redone, not trusted.
  (train / "shard_00004.tokens.npy").write_bytes(b"garbage")
  monkeypatch.setattr(prepare, "write_shard", original)
  prepare_files(text_corpus, tmp_path)
  assert folder_bytes(tmp_path) == folder_bytes(out)
  # A changed source starts the split over instead of mixing old and new shards.
  cfg = prepare_files(text_corpus, tmp_path, val_fraction=0.5)
  assert_same_rows(
    in_memory_rows(cfg, "validation"), prepared.open_split(tmp_path / "validation", ByteTokenizer(), SEQ)
  )


def test_tokenizer_mismatch_stops_with_one_line(prepared_corpus, tmp_path):
  out, _ = prepared_corpus
  model = spm.train(SENTENCES, tmp_path / "t.model", vocab_size=36)
  with pytest.raises(config_lib.ConfigError) as error:
    prepared.open_split(out / "train", SentencePieceTokenizer(model), SEQ)
  assert "another tokenizer" in str(error.value) and "\n" not in str(error.value)


def test_cli_prepare_then_train_with_another_tokenizer_is_one_line(text_corpus, tmp_path, capfd):
  data_args = [
    "--config.data.source=files",
    f"--config.data.paths={text_corpus}/*.txt",
    "--config.data.val_fraction=0.2",
  ]
  result = run_cli(
    [
      "prepare",
      "--config",
      str(REPO / "configs" / "tiny.py"),
      "--out",
      str(tmp_path / "out"),
      "--workers",
      "2",
      "--shard-mb",
      "0.02",
      *data_args,
    ]
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "documents" in result.stdout and (tmp_path / "out" / "validation" / "index.json").is_file()
  model = spm.train(SENTENCES, tmp_path / "t.model", vocab_size=36)
  capfd.readouterr()
  # train refuses before it starts anything: run in this process (main.main), its output captured at the fds.
  assert (
    main.main(
      [
        "train",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.data.source=prepared",
        f"--config.data.prepared_dir={tmp_path / 'out'}",
        "--config.data.tokenizer=sentencepiece",
        f"--config.data.tokenizer_path={model}",
      ]
    )
    == 2
  )
  stderr = capfd.readouterr().err
  errors = [line for line in stderr.splitlines() if line.startswith("jaxlm: error:")]
  assert len(errors) == 1 and "Traceback" not in stderr  # (libtpu, when installed, logs its own lines)
  assert errors[0].startswith("jaxlm: error: data.prepared_dir")


def prepared_documents(directory):
  """The set of documents (text) in a prepared split folder."""
  rows = prepared.PreparedRows(directory, SEQ)
  tokens = rows.tokens(0, int(rows.offsets[-1]))
  ends = np.flatnonzero(tokens == ByteTokenizer.eos_id)
  return {ByteTokenizer().decode(piece) for piece in np.split(tokens, ends + 1) if len(piece)}


def test_validation_holds_no_training_document(text_corpus, tmp_path):
  all_files = {corpus.read_text_bytes(p).decode() for p in text_corpus.glob("*.txt")}
  prepare_files(text_corpus, tmp_path / "hashed")
  train, validation = (prepared_documents(tmp_path / "hashed" / split) for split in ("train", "validation"))
  assert train and validation and not train & validation and train | validation == all_files
  # Explicit validation files are exactly the validation split.
  prepare_files(text_corpus, tmp_path / "explicit", validation_paths=str(text_corpus / "doc0[0-2].txt"))
  train, validation = (prepared_documents(tmp_path / "explicit" / split) for split in ("train", "validation"))
  held_out = {(text_corpus / f"doc0{i}.txt").read_text() for i in range(3)}
  assert validation == held_out and train == all_files - held_out
  # One file is cut: training gets the head, validation the tail, and no byte is in both.
  one = text_corpus / "doc07.txt"
  prepare_files(text_corpus, tmp_path / "one", paths=str(one), val_fraction=0.25)
  parts = [prepared.PreparedRows(tmp_path / "one" / s, SEQ) for s in ("train", "validation")]
  texts = [ByteTokenizer().decode(r.tokens(0, int(r.offsets[-1]))) for r in parts]
  assert texts[0] + texts[1] == one.read_text() and len(texts[1]) == len(one.read_bytes()) - int(
    0.75 * len(one.read_bytes())
  )


def two_sources(text_corpus, tmp_path):
  """Two prepared folders from disjoint halves of the corpus, and a 3:1 mixture of them."""
  files = sorted(text_corpus.glob("*.txt"))
  for name, part in (("first", files[:15]), ("second", files[15:])):
    prepare_files(text_corpus, tmp_path / name, paths=",".join(map(str, part)))
  cfg = files_config(text_corpus)
  cfg.data.source = "prepared"
  cfg.data.mixture = repr([(str(tmp_path / "first"), 3), (str(tmp_path / "second"), 1.0)])
  return cfg


def test_mixture_resumes_exactly_and_realizes_its_weights(text_corpus, tmp_path):
  cfg = two_sources(text_corpus, tmp_path)
  rows = data_lib.decoder_rows(cfg, ByteTokenizer(), "train")
  assert isinstance(rows, mixture.Mixture)
  take = lambda start, steps, threads=0: [
    b["inputs"] for b in itertools.islice(data_lib.train_batches(rows, 8, 5, start, start + steps, threads), steps)
  ]
  full = take(0, 60)
  for start in (7, 33):
    for a, b in zip(full[start:], take(start, 60 - start)):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(full, take(0, 60, threads=2)):
    np.testing.assert_array_equal(a, b)
  shares = mixture.realized_proportions(rows, 5, 0, 60, 8)
  assert shares.keys() == {"mixture/first", "mixture/second"}
  assert abs(shares["mixture/first"] - 0.75) < 0.06 and sum(shares.values()) == pytest.approx(1.0)
  # Each row is a row of the source the draw names.
  first = {rows.sources[0][i]["inputs"].tobytes() for i in range(len(rows.sources[0]))}
  drawn = rows.source_of(5, np.arange(8 * 60))
  from_first = np.array([row.tobytes() in first for batch in full for row in batch])
  np.testing.assert_array_equal(from_first, drawn == 0)
  validation = data_lib.decoder_rows(cfg, ByteTokenizer(), "validation")
  assert len(validation) == sum(
    len(prepared.PreparedRows(tmp_path / n / "validation", SEQ)) for n in ("first", "second")
  )
  assert mixture.realized_proportions(validation, 5, 0, 60, 8) == {}


def test_bad_mixture_is_one_line():
  for text in ("web:0.5", "[('a', 0)]", "[]", "[('a', 1e999), ('b', 1)]", "[('a', -1e999)]"):
    with pytest.raises(config_lib.ConfigError, match="data.mixture") as error:
      mixture.parse(text)
    assert "\n" not in str(error.value)


def test_mixture_weights_near_the_float_maximum_are_normalised_without_overflow(text_corpus, tmp_path):
  cfg = two_sources(text_corpus, tmp_path)
  cfg.data.mixture = repr([(str(tmp_path / "first"), 1e308), (str(tmp_path / "second"), 1e308)])
  rows = data_lib.decoder_rows(cfg, ByteTokenizer(), "train")
  shares = rows.realized_proportions(5, 0, 100, 8)
  assert abs(shares["mixture/first"] - 0.5) < 0.06 and abs(shares["mixture/second"] - 0.5) < 0.06


def damage(source, tmp_path, name, change):
  """A copy of the prepared train split `source` with `change(bytes) -> bytes` applied to its file `name`."""
  copy = tmp_path / name.replace("/", "_")
  shutil.copytree(source, copy)
  (copy / name).write_bytes(change((copy / name).read_bytes()))
  return copy


def put_token(data, index, value):
  """A tokens .npy file's bytes with token `index` (after the 128-byte header) set to `value`."""
  data = bytearray(data)
  data[128 + 2 * index : 130 + 2 * index] = np.uint16(value).tobytes()
  return bytes(data)


def recompute_checksums(split):
  """index.json made to match the (changed) shard files again, as another tokenizer's prepare would have."""
  index = json.loads((split / "index.json").read_text())
  for shard in index["shards"]:
    sums, blocks = prepare.checksums(
      (split / shard["tokens"]).read_bytes(), shard["num_tokens"] * 2, index["block_bytes"]
    )
    shard.update(sums)
    (split / shard["checksums"]).write_bytes(blocks)
  (split / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
  "name,change,expected",
  [
    ("shard_00002.tokens.npy", lambda d: put_token(d, 5, 65535), "shard_00002.tokens.npy': tokens 0..32767 do not"),
    ("shard_00002.tokens.npy", lambda d: put_token(d, 5, ord("x")), "shard_00002.tokens.npy': tokens 0..32767 do not"),
    ("shard_00001.tokens.npy", lambda d: d[:-7], "shard_00001.tokens.npy' has"),
    ("shard_00003.tokens.npy", lambda d: d[:20] + b"#" + d[21:], "shard_00003.tokens.npy': its .npy header"),
    ("index.json", lambda d: d[: len(d) // 2], "index.json' is not valid JSON"),
    ("shard_00004.checksums.npy", lambda d: d[:-1] + bytes([d[-1] ^ 1]), "shard_00004.checksums.npy' does not"),
    ("index.json", lambda d: d.replace(b'"checksums_crc32"', b'"checksums_crc"'), "index.json' lacks"),
  ],
)
def test_damaged_prepared_data_is_one_line_naming_the_file(prepared_corpus, tmp_path, name, change, expected):
  split = damage(prepared_corpus[0] / "train", tmp_path, name, change)
  with pytest.raises(config_lib.ConfigError) as error:
    rows = prepared.open_split(split, ByteTokenizer(), SEQ)
    rows.tokens(0, int(rows.offsets[-1]))
  assert expected in str(error.value) and "\n" not in str(error.value), error.value


@pytest.mark.parametrize("name", ["shard_00002.tokens.npy", "index.json"])
def test_doing_what_the_message_says_repairs_the_split(prepared_corpus, tmp_path, name):
  original = prepared_corpus[0] / "train"
  split = damage(original, tmp_path, name, lambda d: put_token(d, 5, 65535) if name.endswith(".npy") else d[:9])
  with pytest.raises(config_lib.ConfigError) as error:
    rows = prepared.open_split(split, ByteTokenizer(), SEQ)
    rows.tokens(0, int(rows.offsets[-1]))
  named = re.findall(r"delete '([^']+)' and '([^']+)'", str(error.value))
  for path in named[0] if named else [str(split / "index.json")]:  # "...; delete it" names the index first
    os.remove(path)
  prepare.prepare_split(json.loads((split / "plan.json").read_text()), str(split), workers=1, show_progress=False)
  assert folder_bytes(split) == folder_bytes(original)


def test_token_ids_outside_the_vocabulary_stop_the_read_even_with_matching_checksums(prepared_corpus, tmp_path):
  split = damage(prepared_corpus[0] / "train", tmp_path, "shard_00002.tokens.npy", lambda d: put_token(d, 9, 65535))
  recompute_checksums(split)
  rows = prepared.open_split(split, ByteTokenizer(), SEQ)
  first = int(rows.offsets[2])
  rows.tokens(0, first)  # the shards before it are intact
  with pytest.raises(prepared.PreparedDataError, match="shard_00002.tokens.npy': token id 65535 is outside the voc"):
    rows.tokens(first, first + 20)


@pytest.mark.parametrize("shard_mb", ["0", "-5", "nan", "inf"])
def test_prepare_refuses_a_shard_size_that_is_not_positive(shard_mb, text_corpus, tmp_path, capfd):
  result = run_in_process(prepare_args(text_corpus, tmp_path / "out", "--shard-mb", shard_mb), capfd)
  assert result.returncode == 2 and error_line(result).startswith("jaxlm: error: --shard-mb must be"), result.stderr
  assert not (tmp_path / "out").exists()


def test_prepare_into_an_existing_file_is_one_line(text_corpus, tmp_path, capfd):
  (tmp_path / "taken").write_text("keep me")
  result = run_in_process(prepare_args(text_corpus, tmp_path / "taken"), capfd)
  assert result.returncode == 2 and f"--out '{tmp_path / 'taken'}' is a file" in error_line(result)
  assert (tmp_path / "taken").read_text() == "keep me"


def prepare_args(text_corpus, out, *extra):
  return [
    "prepare",
    "--config",
    str(REPO / "configs" / "tiny.py"),
    "--out",
    str(out),
    "--workers",
    "1",
    "--config.data.source=files",
    f"--config.data.paths={text_corpus}/*.txt",
    *extra,
  ]


WORKER = """
import itertools, sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlm.data import pipeline as data_lib, shards as prepared
from jaxlm.parallel import sharding
rows, read = prepared.PreparedRows(sys.argv[3], 32), []
class Recorded:  # the prepared rows, noting which rows this process reads
  seq_len = 32
  def __len__(self): return len(rows)
  def __getitem__(self, i): read.append(int(i)); return rows[i]
batches = list(itertools.islice(data_lib.train_batches(Recorded(), 8, 0, 0, 4), 4))
devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
spec = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
gathered = [multihost_utils.process_allgather(sharding.global_batch(b, spec)["inputs"], tiled=True) for b in batches]
np.savez(sys.argv[4], local=np.stack([b["inputs"] for b in batches]), gathered=np.stack(gathered), read=read)
"""


def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(prepared_corpus, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed, gloo) against this process's whole global batches."""
  out, _ = prepared_corpus
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(out / "train"), str(tmp_path / f"p{i}.npz")],
      cwd=REPO,
      env=env,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  results = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
  rows, everything = prepared.PreparedRows(out / "train", SEQ), []

  class Recorded:  # the same rows read by this one process, which feeds whole global batches
    seq_len = SEQ
    __len__ = rows.__len__

    def __getitem__(self, i):
      everything.append(int(i))
      return rows[i]

  whole = np.stack([b["inputs"] for b in itertools.islice(data_lib.train_batches(Recorded(), 8, 0, 0, 4), 4)])
  np.testing.assert_array_equal(np.concatenate([r["local"] for r in results], axis=1), whole)
  for r in results:
    np.testing.assert_array_equal(r["gathered"], whole)
  read = [set(r["read"].tolist()) for r in results]
  assert len(read[0]) == len(read[1]) == 16 and not read[0] & read[1]
  assert read[0] | read[1] == set(everything)


def logged_steps(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
def test_training_on_a_mixture_resumes_exactly_and_evaluates(text_corpus, tmp_path):
  cfg = two_sources(text_corpus, tmp_path)
  args = lambda workdir, *extra: [
    "train",
    "--config",
    str(REPO / "configs" / "tiny.py"),
    "--workdir",
    str(workdir),
    "--config.data.source=prepared",
    f"--config.data.mixture={cfg.data.mixture}",
    "--config.train.num_steps=4",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=2",
    "--config.train.eval_batches=1",
    *extra,
  ]
  result = run_cli(args(tmp_path / "full"))
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_cli(args(tmp_path / "resumed", "--config.train.stop_at_step=2"))
  assert "stopped at step 2" in result.stderr, result.stderr[-3000:]
  result = run_cli(args(tmp_path / "resumed"))
  assert result.returncode == 0 and "resumed from step 2" in result.stderr, result.stderr[-3000:]
  full, resumed = logged_steps(tmp_path / "full"), logged_steps(tmp_path / "resumed")
  for step in range(1, 5):
    assert resumed[step]["batch_crc32"] == full[step]["batch_crc32"], step
    assert resumed[step]["loss"] == full[step]["loss"], step
    # The realized shares of the rows since the previous log, as the mixture drew them.
    shares = {key: value for key, value in full[step].items() if key.startswith("mixture/")}
    assert shares.keys() == {"mixture/first", "mixture/second"} and sum(shares.values()) == pytest.approx(1)
    assert resumed[step]["mixture/first"] == full[step]["mixture/first"]
  result = run_cli(["eval", "--workdir", str(tmp_path / "full")])  # validation: both sources' own splits
  assert result.returncode == 0 and "gzip -9" in result.stdout, result.stderr[-3000:]


def test_prepare_killed_mid_run_resumes_to_the_same_bytes(tmp_path):
  """kill -9 of `jaxlm prepare` and its workers once some shards are written; a rerun completes them exactly."""
  source = tmp_path / "src"
  source.mkdir()
  for i, path in enumerate(corpus.stdlib_files()[:80]):  # about 2 MB: hundreds of 4 kB shards
    (source / f"doc{i:02d}.txt").write_bytes(corpus.read_text_bytes(path))
  args = lambda out: [
    "prepare",
    "--config",
    str(REPO / "configs" / "tiny.py"),
    "--out",
    str(out),
    "--workers",
    "2",
    "--shard-mb",
    "0.004",
    "--split",
    "train",
    "--config.data.source=files",
    f"--config.data.paths={source}/*.txt",
  ]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  process = subprocess.Popen(
    [sys.executable, "-m", "jaxlm", *args(tmp_path / "killed")],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  train = tmp_path / "killed" / "train"
  while process.poll() is None and len(list(train.glob("shard_*.json"))) < 20:
    time.sleep(0.01)
  os.killpg(process.pid, 9)
  process.wait()
  if (train / "index.json").exists():
    pytest.skip("prepare finished before it could be killed")
  resumed, clean = run_cli(args(tmp_path / "killed")), run_cli(args(tmp_path / "clean"))
  assert resumed.returncode == 0 and clean.returncode == 0, resumed.stderr[-2000:] + clean.stderr[-2000:]
  assert "resuming" in resumed.stderr
  assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "clean")
