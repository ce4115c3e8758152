"""Train on an 8-device mesh, fsdp 4 x tensor 2 (on a CPU, XLA fakes the 8 devices)."""

import glob
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts
import jaxlm

config = jaxlm.load_config_file("configs/tiny.py")
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
config.train.num_steps = 4
texts = [open(path).read() for path in sorted(glob.glob("jaxlm/*.py"))]
trainer = jaxlm.Trainer(config, sys.argv[1], train_data=texts)
trainer.run()
kernel = trainer.state.params["decoder"]["layer_0"]["mlp"]["up"]["kernel"]  # axes (embed, mlp)
print(dict(trainer.setup.mesh.shape), kernel.sharding.spec)
