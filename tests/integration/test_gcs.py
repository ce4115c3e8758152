"""gs:// work directories and data against a local GCS emulator (tests/gcs_emulator.py).

The emulator runs on 127.0.0.1 for this module only. Its environment points
gcsfs (and so etils.epath), google-cloud-storage, TensorStore and array_record
at it, in this process and in the `jaxlm` processes the tests start, so every
byte a run writes lands in the emulator's buckets and can be listed through
the JSON API. The slow tests share one reference run (`reference_run`).
"""

import json
import os
import subprocess
import sys

import gcs_emulator
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import REPO, free_port, tensorboard_scalars, tiny_config, xla_flags

from jaxlm.storage import fs

BUCKET = "jaxlm-test"


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.serving(BUCKET) as server:
    yield server


# --- the path module and the client libraries against the emulator -----------------------------------


def test_paths_keep_urls():
  url = "gs://bucket/runs/x"
  assert os.fspath(fs.path(url) / "config.json") == "gs://bucket/runs/x/config.json"
  assert os.fspath(fs.absolute(url)) == url  # epath's own absolute() would give <cwd>/gs:/bucket/...
  assert fs.join(url, "checkpoints", "3") == "gs://bucket/runs/x/checkpoints/3"
  assert fs.bucket_of(url) == "bucket"
  assert fs.is_url(url) and not fs.is_url("runs/x")
  assert os.fspath(fs.absolute("runs/x")) == os.path.join(os.getcwd(), "runs/x")


def test_files_and_globs_in_a_bucket(emulator):
  base = f"gs://{BUCKET}/files"
  fs.write_text(f"{base}/a.txt", "alpha")
  fs.write_bytes(f"{base}/sub/b.txt", b"beta")
  fs.write_text(f"{base}/c.json", "{}")
  assert fs.read_bytes(f"{base}/a.txt") == b"alpha"
  assert fs.glob(f"{base}/*.txt") == [f"{base}/a.txt"]
  assert fs.glob(f"{base}/**/*.txt") == [f"{base}/a.txt", f"{base}/sub/b.txt"]
  assert emulator.list_objects(BUCKET, "files/") == ["files/a.txt", "files/c.json", "files/sub/b.txt"]
  fs.move(f"{base}/sub", f"{base}-moved/deeper/sub")  # a folder, to a parent that holds nothing yet
  assert emulator.list_objects(BUCKET, "files") == ["files-moved/deeper/sub/b.txt", "files/a.txt", "files/c.json"]


def test_append_file_rewrites_the_object(emulator):
  location = f"gs://{BUCKET}/append/metrics.jsonl"
  first = fs.AppendFile(location, upload_every_s=0)
  first.write('{"step": 1}\n')
  first.flush()
  assert fs.read_bytes(location) == b'{"step": 1}\n'
  first.close()
  second = fs.AppendFile(location, upload_every_s=3600)  # reopened, as on resume: keeps what is there
  second.write(b'{"step": 2}\n')
  second.flush()  # the first flush uploads at once
  assert fs.read_bytes(location) == b'{"step": 1}\n{"step": 2}\n'
  second.write(b'{"step": 3}\n')
  second.flush()  # within upload_every_s of the last upload: not yet
  assert fs.read_bytes(location) == b'{"step": 1}\n{"step": 2}\n'
  second.close()
  assert fs.read_bytes(location) == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_tensorboard_events_in_a_bucket(emulator):
  logdir = f"gs://{BUCKET}/tb"
  writer = fs.tensorboard_writer(logdir)
  for step in range(3):
    writer.add_scalar("loss", 1.0 / (step + 1), step)
  writer.close()
  names = emulator.list_objects(BUCKET, "tb/")
  assert len(names) == 1 and "tfevents" in names[0]
  scalars = tensorboard_scalars(fs.read_bytes(f"gs://{BUCKET}/{names[0]}"))
  assert scalars == {"loss": [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]}


def test_orbax_and_tensorstore_write_to_the_emulator(emulator):
  """Orbax writes metadata through epath (gcsfs) and arrays through TensorStore's GCS driver."""
  directory = fs.path(f"gs://{BUCKET}/orbax")
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state = {"w": jax.device_put(np.arange(16, dtype=np.float32), sharding)}
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1))
  for step in (1, 2):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
  manager.close()
  names = emulator.list_objects(BUCKET, "orbax/")
  assert any(n.startswith("orbax/2/state/") for n in names)
  assert not any(n.startswith("orbax/1/") for n in names)  # max_to_keep deleted step 1 in the bucket
  # Restore onto another sharding (one device) from the bucket.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"w": jax.ShapeDtypeStruct((16,), np.float32, sharding=one)}
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(
    2,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    ),
  )["state"]
  manager.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16, dtype=np.float32))


def test_metrics_rollback_and_the_workdir_lock_in_a_bucket(emulator, tmp_path, monkeypatch):
  from jaxlm.storage import runlock

  monkeypatch.chdir(tmp_path)
  workdir = f"gs://{BUCKET}/rollback"
  fs.write_text(
    f"{workdir}/metrics.jsonl", "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
  )
  assert runlock.drop_metrics_after(workdir, 3) == 2
  kept = [json.loads(line)["step"] for line in fs.read_bytes(f"{workdir}/metrics.jsonl").decode().splitlines()]
  moved = [json.loads(line) for line in fs.read_bytes(f"{workdir}/metrics.rolled_back.jsonl").decode().splitlines()]
  assert kept == [1, 2, 3] and [(m["step"], m["rolled_back_to"]) for m in moved] == [(4, 3), (5, 3)]
  with runlock.WorkdirLock(workdir):  # in a bucket the lock is an object (tests/integration/test_bucket_faults.py)
    assert f"rollback/{runlock.LOCK_NAME}" in emulator.list_objects(BUCKET, "rollback/")
  assert emulator.list_objects(BUCKET, "rollback/") == ["rollback/metrics.jsonl", "rollback/metrics.rolled_back.jsonl"]
  assert list(tmp_path.iterdir()) == []


# --- access checks -----------------------------------------------------------------------------------


def test_check_access(emulator):
  fs.check_access(f"gs://{BUCKET}/run", write=True)
  assert emulator.list_objects(BUCKET, "run/") == []  # the write probe cleaned up after itself
  fs.check_access("relative/local/path", write=True)  # local paths are not checked here
  with pytest.raises(fs.StorageError) as error:
    fs.check_access("gs://no-such-bucket/run", write=True)
  message = str(error.value)
  assert "\n" not in message
  assert "gs://no-such-bucket: bucket not found" in message
  assert "gcloud storage buckets create gs://no-such-bucket" in message


class _RefusingFileSystem:
  """Stands in for gcsfs where the emulator cannot: Cloud Storage answering 403 Forbidden."""

  def __init__(self, method: str):
    self.credentials = type("Credentials", (), {"method": method})()

  def ls(self, path, **kwargs):
    raise OSError(f"Forbidden: b/{path}/o\nCaller does not have storage.objects.list access")


@pytest.mark.parametrize(
  "method,expected",
  [
    (
      "anon",
      "gs://private: access refused; no Google credentials were found: run `gcloud auth "
      "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
    ),
    (
      "cloud",
      "gs://private: cannot write to gs://private/run (Forbidden: b/private/o); grant roles/storage.objectUser "
      "on the bucket to the account jaxlm runs as (on a TPU VM, its service account)",
    ),
  ],
)
def test_check_access_names_credentials_or_the_role(monkeypatch, method, expected):
  import fsspec

  monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url: (_RefusingFileSystem(method), url))
  with pytest.raises(fs.StorageError) as error:
    fs.check_access("gs://private/run", write=True)
  assert str(error.value).startswith(expected)


def test_check_access_unreachable():
  """An endpoint nobody answers on: one message after the timeout, not gcsfs's minute of retries."""
  code = (
    "from jaxlm.storage import fs\n"
    "try:\n  fs.check_access('gs://bucket/run', timeout_s=2)\n"
    "except fs.StorageError as e:\n  print(e)\n"
  )
  env = {
    **os.environ,
    "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert result.stdout.startswith("gs://bucket: no answer from Cloud Storage within 2 s"), result


# --- data in a bucket --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gs_corpus(emulator, text_corpus):
  """The local test corpus copied to gs://BUCKET/corpus/; returns the glob."""
  for path in sorted(text_corpus.glob("*.txt")):
    fs.write_bytes(f"gs://{BUCKET}/corpus/{path.name}", path.read_bytes())
  return f"gs://{BUCKET}/corpus/*.txt"


def test_data_globs_split_a_bucket_like_a_folder(gs_corpus, text_corpus):
  """Split keys are names past the glob's fixed prefix, so a bucket copy splits exactly like the folder."""
  from jaxlm.data import corpus

  local = corpus.glob_files_with_keys([str(text_corpus / "*.txt")])
  remote = corpus.glob_files_with_keys([gs_corpus])
  assert sorted(remote.values()) == sorted(local.values()) and len(remote) == 30
  assert all(os.fspath(path).startswith(f"gs://{BUCKET}/corpus/") for path in remote)
  assert corpus.absolute_patterns(gs_corpus) == gs_corpus  # os.path.abspath would make it <cwd>/gs:/...
  first = min(remote)
  assert corpus.documents(first, 0, fs.size(first)) == [(text_corpus / os.fspath(first).rsplit("/", 1)[1]).read_bytes()]


def test_sentencepiece_model_in_a_bucket(emulator, text_corpus):
  from jaxlm.data import spm
  from jaxlm.data import tokenizer as tokenizer_lib

  lines = [line for path in sorted(text_corpus.glob("*.txt")) for line in path.read_text().splitlines()]
  model = f"gs://{BUCKET}/spm/code.model"
  spm.train(lines, model, vocab_size=300)
  tokenizer = tokenizer_lib.SentencePieceTokenizer(model)
  assert tokenizer.vocab_size == 301
  assert tokenizer.decode(tokenizer.encode("def parse(text):")) == "def parse(text):"
  tokenizer.save(f"gs://{BUCKET}/spm-run")
  loaded = tokenizer_lib.load(f"gs://{BUCKET}/spm-run")
  np.testing.assert_array_equal(loaded.encode("return x + 1"), tokenizer.encode("return x + 1"))


def test_tfds_data_dir_in_a_bucket(emulator, tmp_path):
  """A dataset prepared as array_record, copied to a bucket, read by `data.tfds_data_dir=gs://...`."""
  import tensorflow_datasets as tfds

  from jaxlm.data import tfds_data

  class JaxlmGcsText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train"), "validation": self._generate_examples("validation")}

    def _generate_examples(self, split):
      for i in range(12):
        yield i, {"text": f"{split} document {i}"}

  JaxlmGcsText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig()
  )
  for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
    fs.write_bytes(f"gs://{BUCKET}/tfds/{path.relative_to(tmp_path).as_posix()}", path.read_bytes())
  config = tiny_config()
  config.data.source, config.data.tfds_name = "tfds", "jaxlm_gcs_text"
  config.data.tfds_data_dir = f"gs://{BUCKET}/tfds"
  documents = tfds_data.load_documents(config.data, "validation")
  assert sorted(documents) == sorted(f"validation document {i}".encode() for i in range(12))


# --- jaxlm commands with a gs:// work directory ------------------------------------------------------

TINY = str(REPO / "configs" / "tiny.py")
STEPS = 12


def train_args(workdir: str, corpus_glob: str, *extra: str) -> list[str]:
  return [
    "train",
    "--config",
    TINY,
    "--workdir",
    workdir,
    "--config.data.source=files",
    f"--config.data.paths={corpus_glob}",
    "--config.data.val_fraction=0.2",
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.train.eval_every=6",
    "--config.train.eval_batches=2",
    "--config.train.keep_checkpoints=3",
    "--config.eval.max_batches=2",
    *extra,
  ]


def jaxlm(args: list[str], cwd, devices: int = 8, env: dict | None = None, timeout: int = 600, **popen):
  """`python -m jaxlm ARGS` run from `cwd` (not the repository), with the emulator's environment."""
  environment = {**os.environ, "XLA_FLAGS": xla_flags(devices), **(env or {})}
  command = [sys.executable, "-m", "jaxlm", *args]
  if popen:
    return subprocess.Popen(command, cwd=cwd, env=environment, text=True, **popen)
  return subprocess.run(command, cwd=cwd, env=environment, text=True, capture_output=True, timeout=timeout)


def read_metrics(workdir: str) -> dict[int, dict]:
  rows = [json.loads(line) for line in fs.read_bytes(f"{workdir}/metrics.jsonl").decode().splitlines()]
  return {row["step"]: row for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def reference_run(emulator, gs_corpus, tmp_path_factory):
  """An uninterrupted run into gs://BUCKET/ref, trained from a scratch folder; returns (workdir, cwd)."""
  cwd = tmp_path_factory.mktemp("train_cwd")
  workdir = f"gs://{BUCKET}/ref"
  result = jaxlm(train_args(workdir, gs_corpus), cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, cwd


@pytest.mark.slow
def test_run_files_land_in_the_bucket_and_no_local_gs_folder(emulator, reference_run):
  workdir, cwd = reference_run
  names = emulator.list_objects(BUCKET, "ref/")
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "train_summary.json"):
    assert f"ref/{name}" in names
  assert any(n.startswith("ref/tensorboard/events.out.tfevents") for n in names)
  assert any(n.startswith(f"ref/checkpoints/{STEPS}/") for n in names)
  assert json.loads(fs.read_bytes(f"{workdir}/train_summary.json"))["stop_reason"] == "finished"
  assert sorted(read_metrics(workdir)) == list(range(1, STEPS + 1))
  assert list(cwd.iterdir()) == []  # nothing local: no gs:/bucket/... folder, no stray files
  assert not (REPO / "gs:").exists()


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(emulator, reference_run, gs_corpus, tmp_path):
  """kill -9 mid-run, then the same command: the final params equal the uninterrupted run's bit for bit."""
  from jaxlm import loader

  workdir = f"gs://{BUCKET}/killed"
  process = jaxlm(train_args(workdir, gs_corpus), tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if "step 8:" in line:  # step 6 waited for step 3's save: one checkpoint is complete
      process.kill()  # SIGKILL: no handler runs, an async save may be cut short
      break
  process.wait(timeout=60)
  assert process.returncode == -9, "".join(seen)[-3000:]
  assert not fs.path(f"{workdir}/train_summary.json").exists()
  resumed = jaxlm(train_args(workdir, gs_corpus), tmp_path / "..")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  reference, again = loader.load(reference_run[0], STEPS), loader.load(workdir, STEPS)
  for expected, actual in zip(jax.tree.leaves(reference.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
  assert read_metrics(workdir)[STEPS]["loss"] == read_metrics(reference_run[0])[STEPS]["loss"]
  assert not (tmp_path / "gs:").exists()


@pytest.mark.slow
def test_eval_and_generate_from_another_folder(emulator, reference_run, tmp_path):
  workdir, _ = reference_run
  evaluated = jaxlm(["eval", "--workdir", workdir], tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(fs.read_bytes(f"{workdir}/eval_step_{STEPS}.json"))
  assert np.isfinite(result["loss"]) and result["step"] == STEPS
  generated = jaxlm(
    ["generate", "--workdir", workdir, "--prompt", "def ", "--max-tokens", "8", "--temperature", "0", "--ignore-eos"],
    tmp_path,
  )
  assert generated.returncode == 0, generated.stderr[-3000:]
  assert generated.stdout.endswith("\n") and "Traceback" not in generated.stderr  # the tiny model's text is noise
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_share_a_bucket_then_restore_on_one_device(emulator, reference_run, gs_corpus, tmp_path):
  """2 processes x 4 CPU devices train into one gs:// work directory with the losses of 1 x 8; the
  checkpoint then evaluates on one device (another mesh) from the bucket."""
  workdir = f"gs://{BUCKET}/multi"
  port = free_port()
  env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
  processes = [
    jaxlm(
      train_args(workdir, gs_corpus),
      tmp_path,
      devices=4,
      env={**env, "JAX_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=900) for p in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  reference, multi = read_metrics(reference_run[0]), read_metrics(workdir)
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(multi[step]["loss"], reference[step]["loss"], rtol=2e-5)
  evaluated = jaxlm(["eval", "--workdir", workdir], tmp_path, devices=1)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert fs.path(f"{workdir}/eval_step_{STEPS}.json").exists()
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_and_hugging_face_conversion_through_a_bucket(emulator, reference_run):
  """`jaxlm export` and `convert --to-hf/--from-hf` artifacts written to and read from gs://."""
  from jaxlm import hf, loader
  from jaxlm.inference import export

  run = loader.load(reference_run[0])
  out = f"gs://{BUCKET}/exported"
  export.export_run(run, out, max_prompt_len=8)
  prompt = [int(i) for i in run.tokenizer.encode("def ")]
  exported = export.load(out).generate([prompt], 4)
  assert len(exported[0]) == 4
  hf_dir = f"gs://{BUCKET}/hf"
  hf.write_hf(run.params, run.config, hf_dir, run.tokenizer)
  config, params = hf.read_hf(hf_dir)
  assert config.model.num_layers == run.config.model.num_layers
  for expected, actual in zip(
    jax.tree.leaves(hf.params_to_hf(run.params, run.config)), jax.tree.leaves(hf.params_to_hf(params, run.config))
  ):
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("command", [["train", "--config", TINY], ["eval"]])
def test_missing_bucket_is_one_line(emulator, command, tmp_path, monkeypatch, capfd):
  """The commands in this process (main.main), from a scratch folder; the emulator's environment is this one's."""
  from jaxlm.cli import main

  monkeypatch.chdir(tmp_path)
  assert main.main([*command, "--workdir", "gs://no-such-bucket/run"]) == 2
  stderr = capfd.readouterr().err
  errors = [line for line in stderr.splitlines() if line.startswith("jaxlm: error:")]
  assert errors == [
    "jaxlm: error: gs://no-such-bucket: bucket not found (from gs://no-such-bucket/run); create it "
    "with `gcloud storage buckets create gs://no-such-bucket --location=REGION` or fix the name"
  ]
  assert "Traceback" not in stderr
  assert list(tmp_path.iterdir()) == []
