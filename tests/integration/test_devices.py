"""`jaxlm devices`, the preflight: on 8 CPU devices in this process, on 1 in a fresh one, and over 2 processes;
and the runtime setting that keeps an installed libtpu from starting on a host without TPU chips."""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import pytest
from support import REPO, TINY, free_port, run_cli, run_in_process, xla_flags

from jaxlm import runtime
from jaxlm.ops import cpu_kernels


def libtpu_version():
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def test_devices_on_eight_cpu_devices(tmp_path, capfd):
  """What the tests' 8 CPU devices give configs/tiny.py: a data mesh of 8, the XLA code for every op (the CPU
  kernels are custom calls, which stand aside on more than one device), a measured peak."""
  result = run_in_process(["devices", "--config", TINY, "--json", str(tmp_path / "d.json")], capfd)
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / "d.json").read_text())
  assert report["versions"]["jax"] == jax.__version__ and report["versions"]["libtpu"] == libtpu_version()
  assert report["platform"] == "cpu" and report["devices"] == {"cpu": 8} and report["device_count"] == 8
  assert (report["process_index"], report["process_count"], report["local_device_count"]) == (0, 1, 8)
  assert report["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1} and report["kernel_devices"] == 8
  assert report["kernels"] == dict.fromkeys(["attention", "norm", "dense", "activation"], "xla")
  assert report["peak_measured"] and report["peak_flops"] > 0 and "measured" in report["peak_label"]
  assert report["memory_per_device"] > 0 and report["compute_dtype"] == "float32"
  lines = result.stdout.splitlines()
  assert len(lines) == 6, result.stdout
  assert lines[-1] == "mesh for " + TINY + ": data 8 x fsdp 1 x expert 1 x tensor 1"


def test_devices_reports_what_a_config_cannot_get_here(capfd):
  """A mesh that does not fill the devices, and a kernel the platform lacks: named in the report, exit 1."""
  result = run_in_process(
    ["devices", "--config", TINY, "--config.mesh.data=3", "--config.model.attention_impl=cudnn"], capfd
  )
  assert result.returncode == 1, result.stderr
  kernels, mesh = result.stdout.splitlines()[-2:]
  assert "attention error: model.attention_impl='cudnn' runs on gpu" in kernels and "norm xla" in kernels
  assert mesh.startswith("mesh for " + TINY + ": error: ") and "--config.mesh.data" in mesh


def test_devices_on_one_device_in_a_fresh_process(tmp_path):
  """One CPU device and float32: the CPU kernels (where they build), a 1x1x1 mesh, and not one line on stderr,
  libtpu installed or not."""
  result = run_cli(["devices", "--json", str(tmp_path / "d.json")], devices=1)
  assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
  report = json.loads((tmp_path / "d.json").read_text())
  assert report["device_count"] == 1 and report["config"] == "the defaults"
  assert report["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  expected = "cpu" if cpu_kernels.available() else "xla"
  assert report["kernels"] == dict.fromkeys(["attention", "norm", "dense", "activation"], expected)
  assert len(result.stdout.splitlines()) == 6


@pytest.mark.slow
def test_devices_across_two_processes(tmp_path):
  """2 processes x 4 CPU devices joined over gloo, as `jaxlm train` joins them: each sees all 8 devices, its
  own 4 and its own index, and the same mesh."""
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(4),
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
    JAX_NUM_PROCESSES="2",
  )
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "jaxlm", "devices", "--config", TINY, "--json", str(tmp_path / f"{i}.json")],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=REPO,
      env=dict(env, JAX_PROCESS_ID=str(i)),
    )
    for i in range(2)
  ]
  for proc in procs:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
  for i in range(2):
    report = json.loads((tmp_path / f"{i}.json").read_text())
    assert (report["process_index"], report["process_count"]) == (i, 2)
    assert (report["device_count"], report["local_device_count"]) == (8, 4)
    assert report["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}


def test_the_tpu_backend_is_skipped_only_without_tpu_chips_and_without_jax_platforms(monkeypatch):
  """The decision, not JAX's reaction (the fresh process above and tests/integration/test_startup_noise.py
  show that): chips on the host, or a JAX_PLATFORMS the user set, leave JAX's TPU backend alone."""
  monkeypatch.setattr(runtime, "tpu_chips_on_host", lambda: True)
  assert not runtime.skip_tpu_backend_without_tpu()
  monkeypatch.setattr(runtime, "tpu_chips_on_host", lambda: False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not runtime.skip_tpu_backend_without_tpu()
  monkeypatch.delenv("JAX_PLATFORMS")
  jax.devices()
  assert not runtime.skip_tpu_backend_without_tpu()  # this process's backends have started: too late


def test_tpu_chips_are_found_by_device_file_or_pci_scan(monkeypatch):
  """TPU chips: a device file, or a TPU in JAX's PCI scan (which matches TPU device ids, not Google's vendor id
  alone, which every Compute Engine VM's network card has)."""
  from jax._src import hardware_utils

  monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [])
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
  assert not runtime.tpu_chips_on_host()
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
  assert runtime.tpu_chips_on_host()
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
  monkeypatch.setattr(runtime.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
  assert runtime.tpu_chips_on_host()
