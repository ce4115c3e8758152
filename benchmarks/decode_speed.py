"""Decode speed: jaxlm cached greedy decoding vs transformers `generate` (torch CPU), same GPT-2 weights.

Command:   python benchmarks/decode_speed.py [--new-tokens 256 --batch-sizes 1,8 --layers 12]
Model:     GPT-2 small's shape (12 layers, d_model 768, 12 heads, vocab 50257), random weights made by
           transformers and imported into jaxlm with jaxlm.hf, so both sides run identical weights.
Measures:  new tokens per second (batch x new tokens / wall time, prefill included) after one warm-up
           generation each (jaxlm's warm-up is its compilation), greedy, no early stop, float32.
Needs:     torch and transformers (the test extras); no network.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--batch-sizes", default="1,8")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
  args = p.parse_args()

  import jax
  import torch
  import transformers

  from jaxlm import hf
  from jaxlm.inference import decode

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=args.layers)).eval()
  with tempfile.TemporaryDirectory() as directory:
    hf_model.save_pretrained(directory)
    config, params = hf.read_hf(directory)
  params = jax.device_put(params)
  generator = decode.Generator(config.model, params)
  rng = np.random.default_rng(0)
  print(
    f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()} {platform.processor() or ''} "
    f"cpus={__import__('os').cpu_count()} torch_threads={torch.get_num_threads()} jax={jax.__version__} "
    f"torch={torch.__version__} transformers={transformers.__version__}"
  )
  print(
    f"GPT-2 shape: {args.layers} layers, d_model 768, vocab 50257; prompt {args.prompt_len}, "
    f"{args.new_tokens} new tokens, greedy, float32"
  )
  print(f"{'batch':>5} {'jaxlm tok/s':>12} {'HF tok/s':>10} {'ratio':>7} {'same tokens':>12}")
  for batch in [int(b) for b in args.batch_sizes.split(",")]:
    prompts_BxP = rng.integers(0, 50257, (batch, args.prompt_len))

    def run_jaxlm():
      return generator.generate([list(row) for row in prompts_BxP], args.new_tokens)

    def run_hf():
      with torch.no_grad():
        ids = torch.tensor(prompts_BxP)
        out = hf_model.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          max_new_tokens=args.new_tokens,
          min_new_tokens=args.new_tokens,
          do_sample=False,
          pad_token_id=0,
        )
      return out[:, args.prompt_len :].tolist()

    results = {}
    for name, fn in (("jaxlm", run_jaxlm), ("hf", run_hf)):
      fn()  # warm-up: compilation for jaxlm, allocator and kernel selection for torch
      start = time.perf_counter()
      tokens = fn()
      results[name] = (batch * args.new_tokens / (time.perf_counter() - start), tokens)
    same = np.mean(np.asarray(results["jaxlm"][1]) == np.asarray(results["hf"][1]))
    print(
      f"{batch:>5} {results['jaxlm'][0]:>12.1f} {results['hf'][0]:>10.1f} "
      f"{results['jaxlm'][0] / results['hf'][0]:>6.2f}x {100 * same:>11.1f}%",
      flush=True,
    )


if __name__ == "__main__":
  main()
