"""Paths for every file a run reads or writes: local folders and `gs://` buckets alike.

All of jaxlm's file I/O goes through `etils.epath.Path`, the path type that
Orbax and TFDS already use. Without TensorFlow installed, epath reaches
`gs://` through fsspec and gcsfs (pure Python, no TensorFlow), and Orbax
writes array data with TensorStore's own GCS driver. Three traps this module
exists to avoid:

- `pathlib.Path("gs://b/run")` folds `//` and names a local folder `gs:/b/run`;
  `path()` keeps the URL.
- `epath.Path.absolute()` and `.resolve()` do the same fold on URLs;
  `absolute()` leaves them alone.
- Object stores have no append: `AppendFile` keeps what was written and
  rewrites the object (at most every `upload_every_s`, and on close).

`check_access` turns a missing bucket, missing credentials or a missing
permission into one `StorageError` line naming the bucket and the fix, before
anything compiles.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import re
import shutil
import socket
import sys
import threading
import time
from typing import Union

from etils import epath

from jaxlm.errors import JaxlmError

PathLike = Union[str, os.PathLike]


class StorageError(JaxlmError, RuntimeError):
  """A bucket that is missing, unreachable or not accessible; the message says which and the fix."""


def is_url(location: PathLike) -> bool:
  """True for `scheme://...` locations (`gs://bucket/run`), False for local paths."""
  return "://" in os.fspath(location)


# 'scheme:' and at least one slash at the start: a URL, or one mistyped ('gs:/b/x'). Bucket names per
# https://cloud.google.com/storage/docs/buckets#naming (dotted names may be longer than 63 characters).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/+)")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def check_location(location: PathLike) -> None:
  """Raises `StorageError` for a location that looks like a URL but is not a well-formed `gs://BUCKET/...`.

  Without it, `GS://b/x` and `s3://b/x` fail deep in fsspec (KeyError, ImportError), `gs:/b/x` becomes a local
  folder named `gs:`, and `gs://` or `gs://b/../x` wait for Cloud Storage's answer to a request it cannot serve.

  Args:
    location: a local path or a URL.
  """
  text = os.fspath(location)
  match = _SCHEME.match(text)
  if not match:
    return
  scheme, slashes = match.groups()
  rest = text[match.end() :]
  if scheme.lower() != "gs":
    raise StorageError(f"'{text}': {scheme}:// is not supported; use a local path or a gs://BUCKET/FOLDER location")
  if scheme != "gs" or len(slashes) == 1:
    raise StorageError(f"'{text}' is not a bucket location; write gs://{rest} (lower case, two slashes)")
  bucket, _, name = rest.partition("/")
  if not bucket or len(slashes) > 2:
    raise StorageError(f"'{text}' names no bucket; write gs://BUCKET/FOLDER")
  if not _BUCKET_NAME.match(bucket):
    raise StorageError(
      f"'{text}': '{bucket}' is not a valid bucket name (3 to 63 lower-case letters, digits, '-', '_' and '.', "
      "starting and ending with a letter or digit)"
    )
  if any(part in (".", "..") for part in name.split("/")):
    raise StorageError(f"'{text}': a bucket has no '.' or '..' folders; write the full path, e.g. gs://{bucket}/FOLDER")


def path(location: PathLike) -> epath.Path:
  """`location` (str, pathlib or epath path) as an `epath.Path`; a URL stays a URL.

  Raises `StorageError` for a malformed URL (see `check_location`).
  """
  check_location(location)
  return epath.Path(location)


def absolute(location: PathLike) -> epath.Path:
  """Local paths made absolute (so a run works from any folder); URLs unchanged."""
  return path(location) if is_url(location) else path(os.path.abspath(os.fspath(location)))


def join(location: PathLike, *names: str) -> str:
  """`location/names...` as a string, keeping a URL's `//`."""
  return os.fspath(path(location).joinpath(*names))


def bucket_of(location: PathLike) -> str:
  """The bucket of a `gs://bucket/...` location."""
  return os.fspath(location).split("://", 1)[1].split("/", 1)[0]


def glob(pattern: str) -> list[str]:
  """Sorted files (not folders) matching `pattern`; `**` matches any depth; URLs come back as URLs."""
  if not is_url(pattern):
    return sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  import fsspec  # local: only URL patterns need it

  filesystem, _ = fsspec.core.url_to_fs(pattern)
  scheme = pattern.split("://", 1)[0]
  found = filesystem.glob(pattern, detail=True)
  return sorted(f"{scheme}://{name}" for name, info in found.items() if info["type"] == "file")


def size(location: PathLike) -> int:
  """The size of the file `location` in bytes."""
  # os.stat for local files: epath's stat also looks up the owner, 10x slower over 100,000 files.
  return path(location).stat().length if is_url(location) else os.path.getsize(location)


def read_bytes(location: PathLike) -> bytes:
  """The contents of the file `location` (local or gs://)."""
  return path(location).read_bytes()


def write_bytes(location: PathLike, data: bytes) -> None:
  """Writes `data` to the file `location` whole or not at all, creating its local folder if needed.

  A local file is written beside its target and renamed into place, so a full disk leaves the old file (or
  none), never a truncated one; a bucket object is atomic already, and buckets have no folders.
  """
  if is_url(location):
    path(location).write_bytes(data)
    return
  target = os.fspath(location)
  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  partial = f"{target}.partial-{os.getpid()}"
  try:
    with open(partial, "wb") as file:
      file.write(data)
    os.replace(partial, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise


def write_text(location: PathLike, text: str) -> None:
  """Writes `text` as UTF-8 to the file `location`; see `write_bytes`."""
  write_bytes(location, text.encode("utf-8"))


def makedirs(location: PathLike) -> None:
  """Creates a local folder and its parents; nothing to do in a bucket, where folders are name prefixes."""
  if not is_url(location):
    path(location).mkdir(parents=True, exist_ok=True)


def move(source: PathLike, destination: PathLike) -> None:
  """Moves a file or folder to `destination` (whose parent folders are created), within one file system."""
  if not is_url(source):
    makedirs(os.path.dirname(os.fspath(destination)))
    shutil.move(os.fspath(source), os.fspath(destination))
    return
  import fsspec  # local: only URLs need it

  filesystem, _ = fsspec.core.url_to_fs(os.fspath(source))
  # Copy, then delete: what a move is in a bucket. (epath's rename wants the destination's folder to
  # hold an object already; gcsfs's mv first tries the newer moveTo call, which emulators lack.)
  filesystem.copy(os.fspath(source), os.fspath(destination), recursive=True)
  filesystem.rm(os.fspath(source), recursive=True)


class AppendFile:
  """A file opened for appending (bytes or str), on a local disk or in a bucket.

  Locally it is an ordinary file in append mode and `flush` writes through.
  In a bucket, where objects cannot be appended to, it keeps the object's
  bytes (those already there, then what is written) and `flush` rewrites the
  object when `upload_every_s` seconds have passed since the last upload;
  `close` always uploads. A kill -9 thus loses at most that many seconds of
  appended lines. Also serves as tensorboardX's record writer (see
  `tensorboard_writer`).
  """

  def __init__(self, location: PathLike, upload_every_s: float = 30.0, raise_failures: bool = True):
    """`raise_failures=False` drops a failed upload (and the later ones) without a word, for writers whose
    caller runs in a background thread that cannot report it (tensorboardX's); the run's own writes report it."""
    self.location = os.fspath(location)
    self.upload_every_s = upload_every_s
    self.raise_failures = raise_failures
    self.failed = False
    self.remote = is_url(location)
    if self.remote:
      target = path(location)
      self.buffer = bytearray(target.read_bytes() if target.exists() else b"")
      self.last_upload = float("-inf")
      self.pending = False
    else:
      makedirs(os.path.dirname(self.location) or ".")
      self.file = open(self.location, "ab")

  def write(self, data: bytes | str) -> None:
    """Appends `data` (str is written as UTF-8)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if self.remote:
      self.buffer += data
      self.pending = True
    else:
      self.file.write(data)

  def flush(self) -> None:
    """Writes through locally; in a bucket uploads unless the last upload is under `upload_every_s` old."""
    if not self.remote:
      self.file.flush()
    elif self.pending and time.monotonic() - self.last_upload >= self.upload_every_s:
      self._upload()

  def _upload(self) -> None:
    if self.failed:  # reported once: a later flush or close does not try again
      return
    try:
      path(self.location).write_bytes(bytes(self.buffer))
    except Exception as e:  # noqa: BLE001 - any failure to reach the bucket becomes one line naming it
      self.failed = True
      if self.raise_failures:
        raise failure(self.location, e) from None
    self.last_upload, self.pending = time.monotonic(), False

  def close(self) -> None:
    """Closes the file; in a bucket uploads what was not uploaded yet."""
    if not self.remote:
      self.file.close()
    elif self.pending:
      self._upload()


@contextlib.contextmanager
def _torch_hidden():
  """tensorboardX imports torch whenever it is installed, only to accept torch tensors, which jaxlm never passes:
  1.2-1.7 s of every run's start on a machine with torch. Unless something imported torch already, an import of
  torch fails (as if absent) while tensorboardX loads; afterwards torch imports as usual."""
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None  # the import system's marker for "not importable"
  try:
    yield
  finally:
    if sys.modules.get("torch", "") is None:
      del sys.modules["torch"]


class _TensorBoardFactory:
  """tensorboardX's record-writer factory for `gs://` (its own GCS writer needs google-cloud-storage
  and crashes in `__del__` when that fails); event files go through `AppendFile`."""

  def open(self, location: str) -> AppendFile:
    return AppendFile(location, raise_failures=False)  # written from tensorboardX's own thread

  def directory_check(self, location: str) -> None:
    del location  # buckets have no folders to create


def tensorboard_writer(logdir: PathLike):
  """A `tensorboardX.SummaryWriter` for `logdir`, local or `gs://`, without TensorFlow.

  Args:
    logdir: the folder for the event files, a local path or a `gs://` location.

  Returns:
    The writer (jaxlm writes Python floats to it with `add_scalar`).
  """
  with _torch_hidden():
    from tensorboardX import SummaryWriter, record_writer  # local: only metric writers need it

  if os.fspath(logdir).startswith("gs://"):
    record_writer.register_writer_factory("gs", _TensorBoardFactory())
  return SummaryWriter(os.fspath(logdir))


# Conditional writes of one object (the work directory's lock in a bucket): Cloud Storage's generation
# preconditions make "create if absent" and "replace if unchanged" atomic. gcsfs has no call for the second,
# so these go through its authenticated request method (`call`), which maps 412 to FileExistsError.


def _object(location: str):
  import fsspec  # local: only URLs need it

  filesystem, _ = fsspec.core.url_to_fs(location)
  bucket, key = location.split("://", 1)[1].split("/", 1)
  return filesystem, bucket, key


def read_object(location: PathLike) -> tuple[bytes, int] | None:
  """The contents and generation of the gs:// object `location`, read in one request.

  Args:
    location: a gs:// object.

  Returns:
    (contents, generation), or None when the object does not exist.
  """
  filesystem, bucket, key = _object(os.fspath(location))
  try:
    headers, contents = filesystem.call("GET", "b/{}/o/{}", bucket, key, alt="media")
  except FileNotFoundError:
    return None
  return contents, int(headers["x-goog-generation"])


def write_object_if(location: PathLike, data: bytes, generation: int) -> int:
  """Writes the gs:// object `location` only if its generation is `generation` (0: only if it does not exist).

  Args:
    location: a gs:// object.
    data: its new contents.
    generation: the generation it must have now; 0 for an object that must not exist.

  Returns:
    The object's new generation.

  Raises:
    FileExistsError: the object's generation is another (someone else wrote or created it).
  """
  filesystem, bucket, key = _object(os.fspath(location))
  upload = f"{filesystem._location}/upload/storage/v1/b/{bucket}/o"
  written = filesystem.call(
    "POST", upload, uploadType="media", name=key, ifGenerationMatch=str(generation), data=data, json_out=True
  )
  return int(written["generation"])


def delete_object_if(location: PathLike, generation: int) -> None:
  """Deletes the gs:// object `location` if its generation is still `generation`; an absent object is fine.

  Args:
    location: a gs:// object.
    generation: the generation it must have.

  Raises:
    FileExistsError: the object has another generation (someone else wrote it); it is left alone.
  """
  filesystem, bucket, key = _object(os.fspath(location))
  with contextlib.suppress(FileNotFoundError):
    filesystem.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))


def check_access(location: PathLike, write: bool = False, timeout_s: float = 20.0) -> None:
  """Raises `StorageError` unless the bucket of a `gs://` location can be listed (and, with
  `write=True`, written to and deleted from under `location`). Local paths pass unchecked.

  Runs in a helper thread so that an unreachable endpoint (gcsfs retries for
  about half a minute) becomes one message after `timeout_s` seconds.
  """
  check_location(location)
  location = os.fspath(location)
  if not location.startswith("gs://"):
    return
  bucket = bucket_of(location)
  outcome: dict = {}
  probe = threading.Thread(target=_probe, args=(location, bucket, write, outcome), daemon=True)
  probe.start()
  probe.join(timeout_s)
  credentials = (
    "no Google credentials were found: run `gcloud auth application-default login` or set "
    "GOOGLE_APPLICATION_CREDENTIALS (on a TPU VM jaxlm uses the VM's service account)"
  )
  if probe.is_alive():
    cause = credentials if outcome.get("anonymous") else "check the network and the credentials"
    raise StorageError(f"gs://{bucket}: no answer from Cloud Storage within {timeout_s:.0f} s; {cause}")
  error = outcome.get("error")
  if error is None:
    return
  if isinstance(error, FileNotFoundError):
    raise StorageError(
      f"gs://{bucket}: bucket not found (from {location}); create it with "
      f"`gcloud storage buckets create gs://{bucket} --location=REGION` or fix the name"
    )
  if outcome.get("anonymous"):
    raise StorageError(f"gs://{bucket}: access refused; {credentials}")
  needed = "roles/storage.objectUser" if write else "roles/storage.objectViewer"
  first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
  raise StorageError(
    f"gs://{bucket}: cannot {'write to' if write else 'read'} {location} ({first_line}); grant "
    f"{needed} on the bucket to the account jaxlm runs as (on a TPU VM, its service account)"
  )


def failure(location: PathLike, error: BaseException, timeout_s: float = 10.0) -> StorageError:
  """One line for a failed write to the gs:// `location`, naming the bucket and what happened to it.

  Asks Cloud Storage (for at most `timeout_s` seconds) whether the bucket still exists and answers, since the
  error of the failed write alone (a 404 for an upload URL, a connection reset) does not say.

  Args:
    location: the gs:// location that could not be written.
    error: the exception the write raised.
    timeout_s: how long the diagnosis may wait for an answer.

  Returns:
    The StorageError to raise.
  """
  try:
    check_access(location, timeout_s=timeout_s)
  except StorageError as diagnosis:
    return StorageError(f"writing {os.fspath(location)} failed: {diagnosis}")
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
  return StorageError(f"gs://{bucket_of(location)}: writing {os.fspath(location)} failed ({first_line})")


def check_run_access(workdir: PathLike, data_config) -> None:
  """`check_access` for a training run: `workdir` for writing, and for reading each gs:// location that
  `data_config` (the config's `data` section) names: paths and validation_paths globs, tokenizer_path,
  tfds_data_dir. Each bucket is checked once."""
  check_access(workdir, write=True)
  checked = {bucket_of(workdir)} if os.fspath(workdir).startswith("gs://") else set()
  named = [data_config.get(key) or "" for key in ("paths", "validation_paths", "tokenizer_path", "tfds_data_dir")]
  for location in ",".join(named).split(","):
    if location.startswith("gs://") and bucket_of(location) not in checked:
      check_access(location)
      checked.add(bucket_of(location))


def _probe(location: str, bucket: str, write: bool, outcome: dict) -> None:
  """Lists one object of the bucket, then writes and deletes a small object under `location`."""
  try:
    import fsspec

    filesystem, _ = fsspec.core.url_to_fs(location)
    outcome["anonymous"] = getattr(getattr(filesystem, "credentials", None), "method", None) == "anon"
    filesystem.ls(bucket, max_results=1)
    if write:
      # One name per host and process: every host of a slice checks its own credentials.
      probe = f"{location.rstrip('/')}/.jaxlm-access-check-{socket.gethostname()}-{os.getpid()}"
      filesystem.pipe(probe, b"")
      filesystem.rm(probe)
  except Exception as e:  # every failure is reported by check_access with its first line
    outcome["error"] = e
