"""A local Google Cloud Storage emulator for the tests: `gcp-storage-emulator` on 127.0.0.1.

`Emulator.start()` runs the emulator in a child process on a free port, with
its objects in memory, and returns once it answers. `environment()` gives the
variables that point every client library jaxlm uses at it:

- gcsfs (and so `etils.epath`, which Orbax uses for its metadata files) and
  google-cloud-storage (Orbax's bucket lookups) read `STORAGE_EMULATOR_HOST`;
- TensorStore (Orbax's array writer) reads `TENSORSTORE_GCS_HTTP_URL`;
- array_record's reader (TFDS data sources) is google-cloud-cpp, which reads
  `CLOUD_STORAGE_EMULATOR_ENDPOINT`;
- gcsfs's zonal/hierarchical-bucket probe talks gRPC to the Storage Control
  API, which the emulator does not serve (each probe waits out a 60 s
  timeout), so `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator

from support import free_port

# gcp-storage-emulator, in memory, with three additions:
# - object downloads carry the `x-goog-generation` header, as Cloud Storage's do. TensorStore reads an object's
#   generation from it (OCDBT's manifest updates are conditional on it) and fails with "Malformed
#   StorageGeneration" without it;
# - uploads and deletes honour `ifGenerationMatch` (412 Precondition Failed when it does not hold), which the
#   emulator ignores: jaxlm's work-directory lock in a bucket is an object created only if absent;
# - a listen backlog of 256 instead of http.server's 5: the emulator serves one request at a time, and a batch's
#   concurrent ranged reads of prepared shards would overflow 5 and wait out the kernel's connection retries
#   (1, 3, 7 s), which Cloud Storage never makes anyone do.
_SERVER = """
import http.server, logging, os, sys, threading, time
http.server.HTTPServer.request_queue_size = 256
from gcp_storage_emulator.handlers import objects

def exit_with_parent(parent):  # a test run killed before its fixture's teardown leaves no emulator behind
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)

threading.Thread(target=exit_with_parent, args=(int(sys.argv[2]),), daemon=True).start()

original_download = objects.download

def download(request, response, storage, *args, **kwargs):
    original_download(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

objects.download = download  # before `server` builds its routing table from it

# Preconditions, as Cloud Storage applies them: `ifGenerationMatch` on an upload or a delete holds when the
# object's current generation equals it ('0': the object must not exist); otherwise 412 Precondition Failed
# and nothing changes. The emulator serves one request at a time, so the check and the write are atomic.
from http import HTTPStatus
from gcp_storage_emulator.exceptions import NotFound

def object_name(request, storage):
    if "upload_id" in request.query:  # a resumable upload's chunk: its name was given when it began
        return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
    if "name" in request.query:
        return request.query["name"][0]
    if request.params.get("object_id"):
        return request.params["object_id"]
    data = request.data
    return (data.get("meta") or {}).get("name") or data.get("name") if isinstance(data, dict) else None

def precondition_failed(request, response, storage, absent):
    wanted = request.query.get("ifGenerationMatch") or [request.get_header("x-goog-if-generation-match")]
    if wanted[0] is None:
        return False
    try:
        current = storage.get_file_obj(request.params["bucket_name"], object_name(request, storage))["generation"]
    except NotFound:
        if absent == "not found":  # deleting an object that does not exist: 404, whatever the precondition
            return False
        current = "0"
    if str(current) == str(wanted[0]):
        return False
    message = "At least one of the pre-conditions you specified did not hold."
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": message,
                             "errors": [{"domain": "global", "reason": "conditionNotMet", "message": message}]}})
    return True

def with_preconditions(handler, absent):
    def checked(request, response, storage, *args, **kwargs):
        try:
            failed = precondition_failed(request, response, storage, absent)
        except NotFound:  # an unknown upload id or bucket: the handler answers as it would have
            failed = False
        if not failed:
            return handler(request, response, storage, *args, **kwargs)
    return checked

for name, absent in (("insert", "0"), ("upload_partial", "0"), ("xml_upload", "0"), ("delete", "not found")):
    setattr(objects, name, with_preconditions(getattr(objects, name), absent))
from gcp_storage_emulator import server
logging.basicConfig(level=logging.ERROR)
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


class Emulator:
  """One emulator process; `url` is its endpoint, e.g. http://127.0.0.1:40123."""

  def __init__(self):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.process: subprocess.Popen | None = None

  def start(self, timeout_s: float = 30.0) -> "Emulator":
    # A file, not a pipe: nobody reads the emulator's log while it runs, and a full pipe would block it.
    self.log = tempfile.TemporaryFile()
    self.process = subprocess.Popen(
      [sys.executable, "-c", _SERVER, str(self.port), str(os.getpid())], stdout=self.log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited: {self.log_text()[-2000:]}")
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, TimeoutError):
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not answer on {self.url} within {timeout_s} s")

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.process = None
    self.log.close()

  def log_text(self) -> str:
    """What the emulator has logged so far (errors only: it runs with --quiet)."""
    self.log.seek(0)
    return self.log.read().decode(errors="replace")

  def environment(self) -> dict[str, str]:
    """The variables that send gcsfs, google-cloud-storage, TensorStore and array_record to this emulator."""
    return {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b?project=test",
      method="POST",
      data=('{"name": "%s"}' % name).encode(),
      headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).read()

  def delete_bucket(self, name: str) -> None:
    """Deletes the bucket `name` and every object in it (as `gcloud storage rm -r gs://NAME` would), even while a
    client keeps writing into it."""
    while True:
      for object_name in self.list_objects(name):
        request = urllib.request.Request(
          f"{self.url}/storage/v1/b/{name}/o/{urllib.parse.quote(object_name, safe='')}", method="DELETE"
        )
        try:
          urllib.request.urlopen(request, timeout=10).read()
        except urllib.error.HTTPError as e:
          if e.code != 404:  # deleted meanwhile by its writer
            raise
      try:
        urllib.request.urlopen(
          urllib.request.Request(f"{self.url}/storage/v1/b/{name}", method="DELETE"), timeout=10
        ).read()
        return
      except urllib.error.HTTPError as e:
        if e.code != 409:  # 409: written to since it was listed; empty it again
          raise

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in `bucket` under `prefix`, through the JSON API (no client library)."""
    import json

    names, token = [], ""
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as response:
        page = json.loads(response.read())
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken", "")
      if not token:
        return sorted(names)


def apply_environment(environment: dict[str, str]) -> dict[str, str]:
  """Sets `environment` in os.environ; returns the previous values (None: unset) for `restore_environment`."""
  previous = {key: os.environ.get(key) for key in environment}
  os.environ.update(environment)
  return previous


def restore_environment(previous: dict[str, str | None]) -> None:
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@contextlib.contextmanager
def serving(bucket: str) -> Iterator[Emulator]:
  """An emulator holding `bucket`, with this process's environment pointing at it until the block ends."""
  server = Emulator().start()
  server.create_bucket(bucket)
  previous = apply_environment(server.environment())
  try:
    yield server
  finally:
    restore_environment(previous)
    server.stop()
