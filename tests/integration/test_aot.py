"""`jaxlm compile`: the real train step compiled for a TPU slice on this CPU machine (libtpu, no TPU).

libtpu comes with the `test` extra; without it these tests skip (the
no-libtpu message itself is tested by hiding the package).
"""

import importlib.util
import json
import math
import os
import shlex
import subprocess

import pytest
from support import REPO

from jaxlm import config as config_lib
from jaxlm.cli import main
from jaxlm.training import aot, chips
from jaxlm.training.memory import StepMemory

TINY = str(REPO / "configs" / "tiny.py")
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: pip install -e '.[test]'"
)


def tiny_param_count() -> int:
  """configs/tiny.py's parameters, counted by hand: byte vocabulary 260, 64 positions, 2 layers of d 32, MLP 64."""
  d, f, vocab, positions, layers = 32, 64, 260, 64, 2
  block = 2 * (2 * d) + 4 * (d * d + d) + (d * f + f) + (f * d + d)  # 2 LayerNorms, q/k/v/out, MLP in/out
  return vocab * d + positions * d + layers * block + 2 * d  # tied embedding, learned positions, final norm


@needs_libtpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_config_fits_v5e_2x2(dtype, tmp_path, capsys):
  """float32 also checks that the CPU kernels (custom calls XLA:TPU lacks) are not chosen for a TPU mesh."""
  out = tmp_path / "report.json"
  status = main.main(
    ["compile", "--config", TINY, "--topology", "v5e:2x2", f"--config.model.dtype={dtype}", "--json", str(out)]
  )
  printed = capsys.readouterr().out
  assert status == 0, printed
  report = json.loads(out.read_text())
  assert report["chips"] == 4 and report["chip"] == "v5e"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
  # Float32 master weights whatever the compute dtype, replicated over the data axis: whole on every chip.
  assert report["params_bytes"] == 4 * tiny_param_count()
  # AdamW: two float32 moments per parameter, plus step counters.
  assert 2 * report["params_bytes"] <= report["optimizer_bytes"] <= 2 * report["params_bytes"] + 64
  assert report["fits"] and 0 < report["peak_bytes"] < report["hbm_bytes"] == 16 * 1024**3
  assert 0 < report["mfu"] <= 1 and report["step_s"] > 0
  assert "fits in 16.00 GiB of HBM" in printed and "MFU <=" in printed


@needs_libtpu
def test_too_big_batch_does_not_fit_in_one_line(capsys):
  # 2M rows of 32 tokens: the logits alone are far beyond a v5e chip's 16 GiB.
  status = main.main(["compile", "--config", TINY, "--topology", "v5e:2x2", "--config.train.global_batch_size=2097152"])
  captured = capsys.readouterr()
  assert status == 1
  verdict = [line for line in captured.out.splitlines() if "does not fit" in line]
  assert len(verdict) == 1 and "HBM" in verdict[0], captured.out
  assert "Traceback" not in captured.out + captured.err


@needs_libtpu
def test_fsdp_shards_the_state(tmp_path):
  """fsdp over 4 chips holds a quarter of each weight sharded along 'embed' (d_model 32 splits evenly)."""
  config = config_lib.apply_overrides(
    config_lib.load_config_file(TINY), ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
  )
  sharded = aot.compile_train_step(config, "v5litepod-4")  # Cloud's spelling of v5e-4
  assert sharded["chip"] == "v5e" and sharded["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
  # Norm scales and biases carry no 'embed' axis and stay whole; every matrix is split four ways.
  whole = 4 * tiny_param_count()
  assert whole / 4 < sharded["params_bytes"] < whole / 2


def test_without_libtpu_one_line(monkeypatch, capsys):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a)
  )
  assert main.main(["compile", "--config", TINY, "--topology", "v5e-4"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "libtpu" in err and "pip install" in err, err


@pytest.mark.parametrize("name", ["v5e-3", "v7x-8", "v5p-7", "v5e:2x2x2", "v5e:0x4", "v5e:3x3", "v2-8"])
def test_bad_topology_one_line(name, capsys):
  assert main.main(["compile", "--config", TINY, "--topology", name]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--topology" in err, err


@pytest.mark.parametrize(
  "args,names",
  [
    (["--decode", "--batch-size", "0"], "--batch-size"),
    (["--decode", "--batch-size", "-3"], "--batch-size"),
    (["--decode", "--prompt-len", "64"], "--prompt-len"),  # tiny's max_len is 64: no room to generate
    (["--decode", "--prompt-len", "-1"], "--prompt-len"),
    (["--json", "."], "--json"),
    (["--json", "no/such/folder/r.json"], "--json"),
  ],
)
def test_bad_compile_arguments_one_line(args, names, capsys):
  """Refused before any compile (so without libtpu too): one line naming the flag, exit 2 (issue 21)."""
  assert main.main(["compile", "--config", TINY, "--topology", "v5e-4", *args]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
  assert "jaxlm: error:" in captured.err and names in captured.err, captured.err


def test_slice_names():
  # Cloud TPU names count chips for v5e/v6e and TensorCores (two per chip) for v4/v5p.
  assert aot.parse_topology("v5e-16") == ("v5e", "v5e:4x4", 16)
  # Cloud's spelling of v5e, and the shape, name the same slice.
  assert aot.parse_topology("v5litepod-16") == aot.parse_topology("v5e:4x4") == aot.parse_topology("v5e-16")
  assert aot.parse_topology("v5litepod:2x4") == ("v5e", "v5e:2x4", 8)
  assert aot.parse_topology("v5p:2x2x1") == aot.parse_topology("v5p-8") == ("v5p", "v5:2x2x1", 4)
  assert aot.parse_topology("v5e-64") == ("v5e", "v5e:8x8", 64)
  assert aot.parse_topology("v5p-32") == ("v5p", "v5:2x2x4", 16)
  assert aot.parse_topology("v4-8") == ("v4", "v4:2x2x1", 4)
  assert aot.parse_topology("v6e-8") == ("v6e", "v6e:2x4", 8)
  assert aot.parse_topology("v5e:2x2") == ("v5e", "v5e:2x2", 4)


def test_roofline_estimate():
  """The estimate by hand: compute-bound without remat is MFU 1; full remat reruns the forward (MFU 3/4)."""
  config = config_lib.load_config_file(TINY)
  config.train.global_batch_size = 4096
  chip = aot.Chip(peak_flops=1e12, hbm_bytes=2**34, hbm_bandwidth=1e15, ici_bandwidth=1e15)
  memory = StepMemory(arguments=10, outputs=10, aliased=0, temporaries=10, code=0)
  mesh = {"data": 4, "fsdp": 1, "tensor": 1}
  est = aot.estimate(config, chip, 4, mesh, 1000, memory)
  from jaxlm.training import flops as metrics

  tokens_per_chip = 4096 * config.data.seq_len / 4
  assert est["bound"] == "compute"
  assert math.isclose(
    est["compute_s"], metrics.flops_per_token(config.model, config.data.seq_len) * tokens_per_chip / 1e12
  )
  assert math.isclose(est["mfu"], 1.0)
  config.model.remat_policy = "full"
  assert math.isclose(aot.estimate(config, chip, 4, mesh, 1000, memory)["mfu"], 0.75)
  # A slow network makes the data-parallel gradient all-reduce (2 (d-1)/d x 1000 bytes) the bound.
  slow = aot.Chip(peak_flops=1e12, hbm_bytes=2**34, hbm_bandwidth=1e15, ici_bandwidth=1.0)
  est = aot.estimate(config, slow, 4, mesh, 1000, memory)
  assert est["bound"] == "network" and math.isclose(est["network_s"], 2 * 3 / 4 * 1000)


def test_roofline_counts_expert_parallel_traffic():
  """Expert parallelism moves each MoE layer's tokens four times (gather and scatter, forward and backward) and
  fsdp gathers every expert's weights, not only the active ones."""
  from jaxlm.training import flops as metrics

  config = config_lib.load_config_file(TINY)
  m = config.model
  m.mlp, m.moe_experts, m.moe_top_k = "swiglu", 4, 2
  config.train.global_batch_size = 64
  slow = aot.Chip(peak_flops=1e30, hbm_bytes=2**34, hbm_bandwidth=1e30, ici_bandwidth=1.0)
  memory = StepMemory(arguments=0, outputs=0, aliased=0, temporaries=0, code=0)
  tokens_per_chip = 64 * config.data.seq_len / 4
  est = aot.estimate(config, slow, 4, {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}, 0, memory)
  assert math.isclose(est["network_s"], 4 * m.num_layers * 3 * tokens_per_chip * m.d_model * 4)  # float32
  est = aot.estimate(config, slow, 4, {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}, 0, memory)
  every_weight = metrics.matmul_params(m) + metrics.inactive_params(m)
  assert metrics.inactive_params(m) > 0
  assert math.isclose(est["network_s"], 3 / 4 * every_weight * (2 * 4 + 4))


@needs_libtpu
def test_decode_compile_shards_the_cache(tmp_path, capsys):
  """--decode: the KV cache is split along batch (data 2) and key/value heads (tensor 2), as declared."""
  out = tmp_path / "decode.json"
  status = main.main(
    [
      "compile",
      "--config",
      TINY,
      "--topology",
      "v5e:2x2",
      "--decode",
      "--batch-size",
      "8",
      "--config.mesh.tensor=2",
      "--json",
      str(out),
    ]
  )
  assert status == 0, capsys.readouterr().out
  report = json.loads(out.read_text())
  # Whole cache: 2 layers x (key, value) x 8 rows x 64 slots x 4 heads x 8 dims x 4 bytes (float32 compute),
  # a quarter per chip, plus each layer's int32 cache index (replicated).
  whole = 2 * 2 * 8 * 64 * 4 * 8 * 4
  assert report["cache_bytes"] == whole // 4 + 2 * 4
  assert report["fits"] and report["step"]["peak_bytes"] < report["hbm_bytes"]
  assert "KV cache" in capsys.readouterr().out


@needs_libtpu
def test_mesh_that_does_not_divide_the_model_one_line(capsys):
  """fsdp 8 cannot split d_model 36 (heads of 9): one line naming the size and the mesh axis, exit 2."""
  status = main.main(
    [
      "compile",
      "--config",
      TINY,
      "--topology",
      "v5e-8",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=-1",
      "--config.model.d_model=36",
    ]
  )
  err = capsys.readouterr().err.strip()
  assert status == 2
  assert len(err.splitlines()) == 1 and "36" in err and "fsdp" in err and "--config.mesh" in err, err


# --- the slice table and tpu/create.sh, which reads it (no second copy in the shell scripts) ---


@pytest.fixture(scope="module")
def fake_gcloud(tmp_path_factory):
  """An environment whose first `gcloud` on PATH fails loudly: a dry run must never reach the real one."""
  bin_dir = tmp_path_factory.mktemp("bin")
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'gcloud must not run in tests' >&2\nexit 99\n")
  (bin_dir / "gcloud").chmod(0o755)
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def create_dry_run(env, accelerator, *extra):
  return subprocess.run(
    ["bash", str(REPO / "tpu" / "create.sh"), "--dry-run", "--name", "t", "--zone", "z", "--project", "p"]
    + ["--accelerator-type", accelerator, *extra],
    capture_output=True,
    text=True,
    env=env,
    timeout=30,
  )


@pytest.mark.parametrize("generation", chips.TPU_GENERATIONS, ids=lambda g: g.names[0])
def test_create_takes_every_spelling_of_the_table(generation, fake_gcloud):
  """Each generation's spellings, in both -N and shape forms, ask gcloud for Cloud's name and the table's runtime."""
  count = next(iter(generation.shapes), 4) * generation.cores_per_chip
  shape = generation.shapes.get(count // generation.cores_per_chip)
  names = [f"{name}-{count}" for name in generation.names]
  names += [f"{name}:{'x'.join(map(str, shape))}" for name in generation.names if shape]
  for name in names:
    result = create_dry_run(fake_gcloud, name)
    assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
    words = shlex.split(result.stdout.splitlines()[0])
    assert words[words.index("--accelerator-type") + 1] == f"{generation.cloud}-{count}", name
    assert words[words.index("--runtime-version") + 1] == generation.runtime, name


def test_create_refuses_a_slice_cloud_does_not_build(fake_gcloud):
  for name in ("v5e-3", "v5litepod:3x3"):
    result = create_dry_run(fake_gcloud, name, "--runtime-version", "x")
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1 and "no such slice" in result.stderr, result.stderr


def test_shell_scripts_keep_no_copy_of_the_slice_table():
  """Runtimes and Cloud's spellings live in jaxlm/training/chips.py only."""
  for script in (REPO / "tpu").glob("*.sh"):
    text = script.read_text()
    for generation in chips.TPU_GENERATIONS:
      if generation.runtime.startswith("v2-alpha"):
        assert generation.runtime not in text, (script.name, generation.runtime)
    assert "v5litepod-*" not in text, script.name
