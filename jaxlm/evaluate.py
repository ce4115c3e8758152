"""Evaluation from a work directory: reload config, tokenizer and checkpoint, score the validation split.

Reports loss, perplexity and bits per byte, beside the bits per byte that
`gzip -9` and `xz -9` reach on the same validation bytes: a language model is
a compressor, and this shows where it stands against standard ones.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
from pathlib import Path

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import sharding, tokenizer as tokenizer_lib, train as train_lib, trainer


class RunError(RuntimeError):
  pass


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise RunError(f"{path} not found; pass the --workdir of a run started with `jaxlm train`")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config_lib.check_schema(config)
  return config


def fit_mesh(config, num_devices: int):
  """The run's mesh if it fits these devices, else all devices on the data axis."""
  try:
    config_lib.mesh_shape(config, num_devices)
  except config_lib.ConfigError:
    trainer.log(f"the run's mesh does not fit {num_devices} devices; evaluating with mesh data={num_devices}")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  dp = config_lib.data_parallel_size(config, num_devices)
  config.eval.batch_size = -(-config.eval.batch_size // dp) * dp
  return config


def restore_params(workdir: Path, step: int | None, s: train_lib.Setup):
  checkpointer = checkpoint_lib.Checkpointer(Path(workdir) / "checkpoints", read_only=True)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise RunError(f"no complete checkpoint in {checkpointer.directory}; train first")
  target = {"params": checkpoint_lib.abstract_with_shardings(s.abstract_state.params, s.state_shardings.params)}
  params = checkpointer.restore(step, target, partial=True)["params"]
  checkpointer.close()
  return params, step


def compression_bits_per_byte(text: bytes) -> dict[str, float]:
  bits = lambda compressed: 8 * len(compressed) / max(len(text), 1)
  return {"gzip-9": bits(gzip.compress(text, compresslevel=9)),
          "xz-9": bits(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))}


def evaluate(workdir: str | Path, step: int | None = None, max_batches: int | None = None) -> dict[str, float]:
  workdir = Path(workdir)
  config = fit_mesh(load_run_config(workdir), jax.device_count())
  if config.model.family != "decoder":
    from jaxlm import family_eval  # BLEU for encoder-decoders, MLM accuracy for encoders
    return family_eval.evaluate(workdir, config, step, max_batches)
  tokenizer = tokenizer_lib.load(workdir)
  mesh = sharding.make_mesh(config)
  s = train_lib.setup(config, mesh)
  params, step = restore_params(workdir, step, s)

  documents = data_lib.load_documents(config.data, "validation")
  rows = data_lib.PackedRows(data_lib.TokenStream.from_documents(documents, tokenizer), config.data.seq_len)
  eval_step = train_lib.make_eval_step(s, s.state_shardings.params)
  byte_lengths = tokenizer.byte_lengths()
  nll = weight = correct = num_bytes = 0.0
  limit = config.eval.max_batches if max_batches is None else max_batches
  for local in data_lib.eval_batches(rows, config.eval.batch_size, limit):
    sums = eval_step(params, sharding.global_batch(local, s.batch_sharding))
    nll += float(sums["nll_sum"])
    weight += float(sums["weight_sum"])
    correct += float(sums["correct_sum"])
    # Each process sums bytes of its own rows; the global sum needs all of them.
    num_bytes += float(np.sum(byte_lengths[local["targets"]] * local["weights"]))
  num_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes))))
  loss = nll / max(weight, 1.0)
  result = {"step": step, "tokens": weight, "loss": loss, "perplexity": math.exp(min(loss, 700)),
            "accuracy": correct / max(weight, 1.0), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1.0)}
  for name, bpb in compression_bits_per_byte(b"".join(documents)).items():
    result[f"{name}_bits_per_byte"] = bpb
  if jax.process_index() == 0:
    (workdir / f"eval_step_{step}.json").write_text(json.dumps(result, indent=2))
  return result
