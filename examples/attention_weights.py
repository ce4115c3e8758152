"""The attention weights of a run's layer 1 (B x heads x T x S), sown on XLA's attention path."""

import sys

import jax.numpy as jnp

import jaxlm

run = jaxlm.load(sys.argv[1])
model_cfg = run.config.model.copy_and_resolve_references()
model_cfg.sow_attention_weights = True
model = jaxlm.build_model(model_cfg)
tokens_BxT = jnp.asarray([run.tokenizer.encode("def main(): return 0")])
_, variables = model.apply({"params": run.params}, tokens_BxT, mutable="intermediates")
weights_BxNxTxS = variables["intermediates"]["decoder"]["layer_1"]["self_attention"]["attention_weights"][0]
print(weights_BxNxTxS.shape, weights_BxNxTxS[0, 0, -1].round(3))
