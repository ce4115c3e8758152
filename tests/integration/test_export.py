"""jax.export artifacts: reloaded in a fresh process without the model code, they generate the same tokens,
and with the tokenizer they carry, the same text."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from support import REPO, tiny_config

from jaxlm import hf, loader
from jaxlm.cli import main
from jaxlm.inference import decode
from jaxlm.models import quantize
from jaxlm.models import transformer as model_lib

PROMPTS = [[2, 70, 71, 72], [2, 80]]
TEXTS = ["def f(x):", "import é"]

LOADER = """
import json, sys
from jaxlm.inference import export
generator = export.load(sys.argv[1])
greedy = generator.generate({prompts}, 12)
sampled = generator.generate({prompts}, 12, export.decode.Sampling(temperature=0.9, top_p=0.9, seed=[1, 2]))
texts = generator.generate({texts}, 12)
one = generator.generate({texts}[0], 12)
leaked = sorted(m for m in sys.modules if m in ("jaxlm.models.transformer", "jaxlm.models.layers", "flax", "flax.linen"))
print(json.dumps({{"greedy": greedy, "sampled": sampled, "texts": texts, "one": one, "leaked": leaked}}))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  config = tiny_config(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, num_kv_heads=2)
  params = model_lib.build(config.model).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  return hf.write_run(config, params, tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("int8", [False, True])
def test_exported_artifact_generates_the_same_tokens_without_model_code(run_dir, tmp_path, int8):
  out = tmp_path / "artifact"
  assert (
    main.main(
      ["export", "--workdir", str(run_dir), "--out", str(out), "--batch-size", "2", "--max-prompt-len", "16"]
      + (["--int8"] if int8 else [])
    )
    == 0
  )
  run = loader.load(run_dir)
  params = quantize.quantize_params(run.params) if int8 else run.params
  generator = decode.Generator(run.config.model, params)
  want_greedy = generator.generate(PROMPTS, 12)
  want_sampled = generator.generate(PROMPTS, 12, decode.Sampling(temperature=0.9, top_p=0.9, seed=[1, 2]))
  # Text: the run's tokenizer, EOS first (a decoder-only model continues after EOS), stopping at EOS.
  tok = run.tokenizer
  new = generator.generate([[tok.eos_id] + [int(i) for i in tok.encode(t)] for t in TEXTS], 12, stop_ids=[tok.eos_id])
  want_texts = [tok.decode(ids) for ids in new]
  assert (out / "tokenizer.json").is_file()
  env = dict(os.environ, XLA_FLAGS="")
  script = LOADER.format(prompts=PROMPTS, texts=TEXTS)
  result = subprocess.run(
    [sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got["leaked"] == []
  assert got["greedy"] == want_greedy
  assert got["sampled"] == want_sampled
  assert got["texts"] == want_texts and got["one"] == want_texts[0]
