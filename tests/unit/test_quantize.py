"""int8 weight-only quantization: per-channel error bounds, memory, perplexity, and quantized generation."""

import json
import math
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import files_config, tiny_config

from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.inference import decode, export
from jaxlm.inference import server as serve
from jaxlm.models import quantize
from jaxlm.models import transformer as model_lib
from jaxlm.tasks import evaluate


def test_per_channel_int8_round_trip():
  cfg = tiny_config(scan_layers=True, d_model=64, mlp_dim=256, num_heads=4).model
  params = hf._unbox(model_lib.build(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
  q = quantize.quantize_params(params)
  kernel = q["decoder"]["layers"]["block"]["self_attention"]["out"]["kernel"]
  assert kernel["int8"].dtype == jnp.int8 and kernel["scale"].shape == (2, 1, 1, 64)  # per layer, per output
  assert q["embedder"]["token"]["embedding"]["scale"].shape == (260, 1)
  assert quantize.is_quantized(q) and not quantize.is_quantized(params)
  restored = quantize.materialize(q)
  for w, r, qq in zip(
    jax.tree.leaves(params), jax.tree.leaves(restored), jax.tree.leaves(q, is_leaf=quantize._is_quantized)
  ):
    if isinstance(qq, dict):
      assert np.all(np.abs(np.asarray(w) - np.asarray(r)) <= np.asarray(qq["scale"]) / 2 + 1e-7)
    else:
      np.testing.assert_array_equal(w, r)
  assert quantize.nbytes(params) / quantize.nbytes(q) > 3.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_corpus):
  config = files_config(text_corpus)
  params = model_lib.build(config.model).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("run"))


def test_compare_and_cli(run_dir, capsys):
  assert main.main(["quantize", "--workdir", str(run_dir), "--max-batches", "2"]) == 0
  out = capsys.readouterr().out
  assert "smaller" in out and f"--workdir {run_dir / 'int8'}" in out and (run_dir / "quantize_step_0.json").is_file()
  # Rerunning replaces the int8 run it wrote before.
  result = evaluate.compare_int8(run_dir, max_batches=2)
  assert result["memory_reduction"] > 2.5 and result["float_source"] == "scored"
  assert abs(result["perplexity_change"]) < 0.02 and result["float_perplexity"] > 1
  assert quantize.is_int8_run(run_dir / "int8") and not quantize.is_int8_run(run_dir)
  # Another run's checkpoints are never overwritten.
  with pytest.raises(quantize.QuantizeError, match="another run"):
    evaluate.compare_int8(run_dir, max_batches=2, out=run_dir)


def test_float_perplexity_is_reused_from_eval(run_dir, capsys):
  """After `jaxlm eval` on the same step, quantize scores only the int8 weights."""
  assert main.main(["eval", "--workdir", str(run_dir)]) == 0
  evaluated = json.loads((run_dir / "eval_step_0.json").read_text())
  result = evaluate.compare_int8(run_dir, out=run_dir / "int8_again")
  assert result["tokens"] == evaluated["tokens"] and result["float_source"] == "eval_step_0.json"
  assert result["float_perplexity"] == pytest.approx(math.exp(evaluated["loss"]), rel=1e-12)


def test_quantized_model_generates_close_to_float(run_dir, capsys):
  run = loader.load(run_dir)
  float_gen = decode.Generator(run.config.model, run.params)
  int8_gen = decode.Generator(run.config.model, quantize.quantize_params(run.params))
  prompts = [[2, 70, 71, 72, 73, 74]]
  assert len(int8_gen.generate(prompts, 8)[0]) == 8
  _, float_logits, _ = jax.jit(float_gen.adapter.prefill, static_argnums=2)(
    run.params, {"tokens_BxP": jnp.asarray(prompts), "lengths_B": jnp.array([6])}, 16
  )
  _, int8_logits, _ = jax.jit(int8_gen.adapter.prefill, static_argnums=2)(
    quantize.materialize(quantize.quantize_params(run.params)),
    {"tokens_BxP": jnp.asarray(prompts), "lengths_B": jnp.array([6])},
    16,
  )
  assert (
    np.abs(np.asarray(float_logits) - np.asarray(int8_logits)).max() < 0.05 * np.abs(np.asarray(float_logits)).max()
  )
  # The CLI streams text from the int8 weights too.
  assert (
    main.main(
      ["generate", "--workdir", str(run_dir), "--prompt", "def f", "--max-tokens", "8", "--int8", "--ignore-eos"]
    )
    == 0
  )
  expected = run.tokenizer.decode(int8_gen.generate([[2] + list(run.tokenizer.encode("def f"))], 8)[0])
  printed = capsys.readouterr()
  assert printed.out == "def f" + expected + "\n"  # the prompt, then what continues it
  assert "8 tokens: " in printed.err and "tokens/s after the first" in printed.err


@pytest.fixture(scope="module")
def int8_run(run_dir):
  """(the int8 run's directory, quantize's report)."""
  out = run_dir.parent / "int8_run"
  return out, evaluate.compare_int8(run_dir, max_batches=1, out=out)


@pytest.mark.slow  # about 35 s: four compiles (generate, serve, eval, export)
def test_the_int8_run_loads_in_generate_serve_eval_and_export(run_dir, int8_run, tmp_path, capsys):
  int8_run, reported = int8_run
  loaded = loader.load(int8_run)
  assert quantize.is_quantized(loaded.params)
  kernels = [leaf for leaf in jax.tree.leaves(loaded.params) if leaf.dtype == jnp.int8]
  assert len(kernels) >= 5  # every matmul kernel and the embedding
  run = loader.load(run_dir)
  tok = run.tokenizer
  ids = [tok.eos_id] + [int(i) for i in tok.encode("def f")]
  int8_gen = decode.Generator(run.config.model, quantize.quantize_params(run.params))
  expected = tok.decode(int8_gen.generate([ids], 8)[0])

  capsys.readouterr()
  assert (
    main.main(
      ["generate", "--workdir", str(int8_run), "--prompt", "def f", "--max-tokens", "8", "--ignore-eos", "--no-echo"]
    )
    == 0
  )
  assert capsys.readouterr().out == expected + "\n"

  background = serve.BackgroundServer(serve.app_for_run(int8_run))
  try:
    body = json.dumps({"prompt": "def f", "max_tokens": 8}).encode()
    request = urllib.request.Request(background.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
      served = json.loads(response.read())["choices"][0]["text"]
  finally:
    background.close()
  # The server stops at EOS; up to there it decodes exactly what the int8 weights give.
  assert expected.startswith(served) and served

  # eval scores the dequantized weights: the int8 perplexity quantize reported.
  assert main.main(["eval", "--workdir", str(int8_run), "--max-batches", "1"]) == 0
  evaluated = json.loads((int8_run / "eval_step_0.json").read_text())
  assert math.exp(evaluated["loss"]) == pytest.approx(reported["int8_perplexity"], rel=1e-4)

  assert main.main(["export", "--workdir", str(int8_run), "--out", str(tmp_path / "artifact")]) == 0
  artifact = export.load(tmp_path / "artifact")
  assert quantize.is_quantized(artifact.params)
  assert artifact.generate("def f", 8, stop_ids=[]) == expected
