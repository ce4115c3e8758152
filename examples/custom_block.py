"""A GPT-J-style parallel block built from jaxlm's Norm, Attention and Mlp; trained, then resumed."""

import glob
import sys

import flax.linen as nn

import jaxlm


class ParallelBlock(jaxlm.Block):  # x + attention(norm(x)) + mlp(norm(x)); Stack adds scan, remat, cache
  @nn.compact
  def __call__(self, x_BxTxD, mask, positions_BxT, *unused):
    h_BxTxD = jaxlm.Norm(self.cfg, name="norm")(x_BxTxD)
    return x_BxTxD + self.self_attention()(h_BxTxD, mask, positions_BxT) + self.mlp()(h_BxTxD)


config = jaxlm.load_config_file("configs/tiny.py")
model = jaxlm.DecoderLM(config.model, deterministic=False, block_cls=ParallelBlock)
texts = [open(path).read() for path in sorted(glob.glob("jaxlm/*.py"))]
for config.train.num_steps in (4, 8):  # the second run resumes from the step-4 checkpoint
  print(jaxlm.train(config, sys.argv[1], model=model, train_data=texts))
