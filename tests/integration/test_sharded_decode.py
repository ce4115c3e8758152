"""Decoding on a mesh: params sharded by the logical rules, the KV cache along batch (data) and kv heads
(tensor); greedy tokens equal one device's, from the API, the CLI and an exported artifact."""

import json
import urllib.request

import jax
import jax.numpy as jnp
import pytest
from support import run_cli, tiny_config

from jaxlm import config as config_lib
from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.inference import decode, export
from jaxlm.inference import server as serve
from jaxlm.models import transformer as model_lib
from jaxlm.parallel import mesh as mesh_lib

PROMPTS = [[5, 6, 7, 8, 9], [40, 41]]  # two lengths: the padded row must decode as it would alone
MESH = {"data": 2, "fsdp": 1, "tensor": 4}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A random-init decoder with 4 kv heads (tensor 4 divides them) and a byte tokenizer."""
  config = tiny_config(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, num_kv_heads=4)
  params = model_lib.build(config.model).init(jax.random.key(3), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("sharded_run"))


@pytest.fixture(scope="module")
def one_device_tokens(run_dir):
  run = loader.load(run_dir)
  return decode.Generator(run.config.model, run.params).generate(PROMPTS, 10)


@pytest.fixture(scope="module")
def sharded(run_dir):
  mesh = mesh_lib.mesh_of_sizes(MESH)
  run = loader.load(run_dir, mesh=mesh)
  return run, mesh, decode.Generator(run.config.model, run.params, mesh=mesh, rules=config_lib.mesh_rules(run.config))


def test_greedy_tokens_on_a_mesh_equal_one_device(sharded, one_device_tokens):
  run, mesh, generator = sharded
  kernel = run.params["decoder"]["layer_0"]["self_attention"]["key"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  assert generator.generate(PROMPTS, 10) == one_device_tokens


def test_the_cache_is_sharded_along_batch_and_kv_heads(sharded):
  run, mesh, generator = sharded
  batch, prompt_len, cache_len = 4, 16, 64
  prompt = {"tokens_BxP": jnp.ones((batch, prompt_len), jnp.int32), "lengths_B": jnp.full((batch,), 3, jnp.int32)}
  sampling = decode.Sampling().arrays(batch)
  with decode.on_mesh(mesh, generator.rules):
    tokens, state = generator.prefill(run.params, prompt, sampling, cache_len=cache_len, do_sample=False)
    tokens, state = generator.step(run.params, state, tokens, sampling, jnp.int32(1), do_sample=False)
  declared = decode.state_shardings(mesh, generator.rules, state)
  caches = [
    (path, x)
    for path, x in jax.tree_util.tree_leaves_with_path(state["cache"])
    if path[-1].key in ("cached_key", "cached_value")
  ]
  assert len(caches) == 2 * run.config.model.num_layers
  heads, head_dim = run.config.model.num_kv_heads, run.config.model.d_model // run.config.model.num_heads
  for path, x in caches:
    assert x.shape == (batch, cache_len, heads, head_dim), path
    assert x.sharding.spec[0] in ("data", ("data",), ("data", "fsdp")) and x.sharding.spec[2] == "tensor", path
    # Each device holds half the rows and one of the four kv heads.
    assert x.sharding.shard_shape(x.shape) == (batch // 2, cache_len, heads // 4, head_dim), path
  for x, expected in zip(jax.tree.leaves(state), jax.tree.leaves(declared)):
    assert x.sharding.is_equivalent_to(expected, x.ndim)


def test_an_artifact_exported_on_a_mesh_generates_the_same_tokens(sharded, one_device_tokens, tmp_path):
  run, mesh, _ = sharded
  out = export.export_run(run, tmp_path / "artifact", batch_size=2, max_prompt_len=16, mesh=mesh)
  artifact = export.load(out)
  assert artifact.meta["mesh"] == {"expert": 1, **MESH}  # every axis, the unused ones at 1
  assert artifact.generate(PROMPTS, 10) == one_device_tokens


def in_process(args, capfd):
  """`jaxlm ARGS` run by main.main in this process: (exit status, stdout, stderr), C++ logs included."""
  capfd.readouterr()
  try:
    status = main.main(args)
  except SystemExit as stop:  # argparse reports a bad flag by exiting, as the command does
    status = stop.code
  out, err = capfd.readouterr()
  return status, out, err


def test_generate_cli_on_a_mesh_prints_the_same_text(run_dir, capfd):
  args = ["generate", "--workdir", str(run_dir), "--prompt", "def f(x):", "--max-tokens", "12", "--ignore-eos"]
  status, alone, _ = in_process(args, capfd)
  on_mesh = run_cli(args + ["--mesh", "data=2,tensor=4"])  # the real command, in its own process
  assert status == 0
  assert on_mesh.returncode == 0, on_mesh.stderr
  assert len(alone) > len("def f(x):") and on_mesh.stdout == alone


@pytest.mark.parametrize(
  "mesh, message",
  [
    ("data=2,tensr=4", "argument --mesh: 'tensr=4' is not AXIS=SIZE"),
    ("tensor=0", "argument --mesh: 'tensor=0' is not AXIS=SIZE"),
    ("data=4,tensor=4", "needs 16 devices but 8 are visible"),
    ("tensor=8", "(8 ways) do not divide"),  # 4 kv heads
  ],
)
def test_bad_mesh_flags_are_one_line(run_dir, mesh, message, capfd):
  status, _, err = in_process(["generate", "--workdir", str(run_dir), "--prompt", "a", "--mesh", mesh], capfd)
  assert status == 2
  assert message in err and "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith("jaxlm")


def test_beam_search_on_a_mesh_equals_one_device(run_dir, sharded):
  run, mesh, generator = sharded
  alone = loader.load(run_dir)
  expected = decode.beam_search(alone.config.model, alone.params, PROMPTS, beam_size=2, max_new_tokens=6)
  with decode.on_mesh(mesh, generator.rules):  # as `jaxlm generate --beam-size --mesh` runs it
    result = decode.beam_search(run.config.model, run.params, PROMPTS, beam_size=2, max_new_tokens=6)
  assert result.tokens == expected.tokens


def test_a_server_on_a_mesh_completes_as_one_device(run_dir):
  server = serve.BackgroundServer(serve.app_for_run(run_dir, max_batch=2, mesh=mesh_lib.mesh_of_sizes(MESH)))
  try:
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 8, "temperature": 0}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
      text = json.load(response)["choices"][0]["text"]
  finally:
    server.close()
  run = loader.load(run_dir)
  ids = decode.adapter_for(run.config.model, run.tokenizer.bos_id).prompt_ids(run.tokenizer, "def f(x):")
  expected = decode.Generator(run.config.model, run.params).generate([ids], 8, stop_ids=[run.tokenizer.eos_id])
  assert text == run.tokenizer.decode(expected[0])
