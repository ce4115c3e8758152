"""Reload a `jaxlm train` run and score a string: bits per byte under the model."""

import math
import sys

import jax.numpy as jnp
import optax

import jaxlm

run = jaxlm.load(sys.argv[1])  # config, model, params (one device), tokenizer, step
text = sys.argv[2] if len(sys.argv) > 2 else "def main():\n    return 0\n"
tokens_BxT = jnp.asarray([[run.tokenizer.eos_id, *run.tokenizer.encode(text)]])  # documents follow an EOS
logits_BxTxV = run.model.apply({"params": run.params}, tokens_BxT[:, :-1])
nll = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT[:, 1:]).sum()
print(f"step {run.step}: {float(nll) / math.log(2) / len(text.encode()):.3f} bits per byte")
