"""jaxlm.storage.fs on local paths (the gs:// cases are in test_gcs.py, against an emulator)."""

import errno
import io

import pytest

from jaxlm.storage import fs


class _FullDisk(io.BytesIO):
  """A file whose write stores half the bytes and then fails as a full disk does."""

  def __init__(self, real):
    super().__init__()
    self.real = real

  def write(self, data):
    self.real.write(data[: len(data) // 2])
    self.real.flush()
    raise OSError(errno.ENOSPC, "No space left on device")

  def __exit__(self, *exc):
    self.real.close()
    return super().__exit__(*exc)


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
  target = tmp_path / "manifest.json"
  fs.write_text(target, '{"files": {}}')
  real_open = open
  monkeypatch.setattr(fs, "open", lambda name, mode: _FullDisk(real_open(name, mode)), raising=False)
  with pytest.raises(OSError, match="No space"):
    fs.write_text(target, '{"files": {"a": [1, 2]}}')
  assert target.read_text() == '{"files": {}}'  # the old code left half the new text here
  assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_creates_the_folder(tmp_path):
  fs.write_bytes(tmp_path / "a" / "b" / "c.bin", b"xyz")
  assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"xyz"
