"""gs:// work directories and data against a local GCS emulator (tests/gcs_emulator.py).

The emulator runs on 127.0.0.1 for this module only. Its environment points
gcsfs, google-cloud-storage and TensorStore at it, in this process and in the
`jaxlm` processes the tests start, so every byte a run writes lands in the
emulator's buckets and can be listed through the JSON API.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gcs_emulator
from jaxlm import fs

BUCKET = "jaxlm-test"


@pytest.fixture(scope="module")
def emulator():
  server = gcs_emulator.Emulator().start()
  server.create_bucket(BUCKET)
  previous = gcs_emulator.apply_environment(server.environment())
  yield server
  gcs_emulator.restore_environment(previous)
  server.stop()


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


def tensorboard_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the bytes of an event file (TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2
  scalars, offset = {}, 0
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], "little")
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4  # length, its CRC, the record, its CRC
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


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
  restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
  manager.close()
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16, dtype=np.float32))


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


def test_check_access_unreachable():
  """An endpoint nobody answers on: one message after the timeout, not gcsfs's minute of retries."""
  code = ("from jaxlm import fs\n"
          "try:\n  fs.check_access('gs://bucket/run', timeout_s=2)\n"
          "except fs.StorageError as e:\n  print(e)\n")
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_emulator.free_port()}",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert result.stdout.startswith("gs://bucket: no answer from Cloud Storage within 2 s"), result
