"""Deployable artifacts: prefill and decode step serialized with `jax.export` (StableHLO), plus the weights.

An artifact directory holds prefill.bin and step.bin (serialized
`jax.export.Exported`), weights.npz (the params, float or int8, flattened
by path), meta.json (shapes and special ids) and the run's tokenizer
(tokenizer.json, and tokenizer.model for SentencePiece), so
`load(DIR).generate` takes and returns text. `load` runs it with jax and
numpy alone: neither the model code (jaxlm.models.transformer, jaxlm.models.layers) nor Flax is
imported, so the artifact decodes wherever jax does. Shapes are fixed at
export time: batch size, prompt width and cache length.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.inference import decode  # model code is imported lazily there, only when a model is built
from jaxlm.parallel import mesh as mesh_lib  # no Flax, no config code
from jaxlm.storage import fs


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a/b/c': leaf} from nested dicts; the artifact's weights.npz and `jaxlm.hf` key params this way."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def unflatten(flat: dict) -> dict:
  """{'a/b/c': array} -> nested {'a': {'b': {'c': array}}}: the params tree from flat weight names."""
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def export_run(run, out, batch_size: int = 1, max_prompt_len: int = 0, mesh=None) -> Path:
  """Exports `run` (a `loader.Run`, params float or int8) to the directory `out`.

  `mesh`: the mesh `run.params` were loaded on (`jaxlm.load(..., mesh=)`), or None. On a mesh the programs
  are traced there, parameters and KV cache sharded as in `decode.Generator`; the artifact records the mesh
  sizes and `load` needs as many devices (the weights file holds the whole params either way)."""
  # jax.export accepts no custom calls, and the artifact must also run off CPU: XLA code only.
  cfg = run.config.model.copy_and_resolve_references()
  cfg.cpu_kernels = False
  prompt_len = decode.round_up(max_prompt_len or max(cfg.max_len // 2, 1), decode.PROMPT_BUCKET)
  adapter = decode.adapter_for(cfg, run.tokenizer.bos_id)
  cache_len = adapter.prompt_slots(prompt_len) + cfg.max_len
  generator = decode.Generator(cfg, run.params, cache_len, start_id=run.tokenizer.bos_id)
  prefill = jax.jit(functools.partial(generator._prefill, cache_len=cache_len, do_sample=True))
  step = jax.jit(functools.partial(generator._step, do_sample=True), donate_argnums=(1,))
  spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), tree)
  # On a mesh the params keep their shardings, which the exported programs then take.
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if mesh else None), run.params
  )
  prompt = {
    "tokens_BxP": jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32),
    "lengths_B": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  sampling = spec(decode.Sampling().arrays(batch_size))
  out = fs.path(out)  # a local folder or gs://
  fs.makedirs(out)
  from jaxlm import config as config_lib  # local: loading an artifact needs no config code

  with decode.on_mesh(mesh, config_lib.mesh_rules(run.config)):
    tokens_B, state = jax.eval_shape(prefill, params, prompt, sampling)
    (out / "prefill.bin").write_bytes(jax.export.export(prefill)(params, prompt, sampling).serialize())
    (out / "step.bin").write_bytes(
      jax.export.export(step)(params, state, tokens_B, sampling, jax.ShapeDtypeStruct((), jnp.int32)).serialize()
    )
  weights = io.BytesIO()  # zip needs a seekable file, which an object being uploaded is not
  np.savez(weights, **flatten(jax.device_get(run.params)))
  (out / "weights.npz").write_bytes(weights.getvalue())
  tok = run.tokenizer
  meta = {
    "family": cfg.family,
    "max_len": cfg.max_len,
    "batch_size": batch_size,
    "prompt_len": prompt_len,
    "cache_len": cache_len,
    "prompt_in_cache": adapter.prompt_in_cache,
    "vocab_size": cfg.vocab_size,
    "eos_id": int(tok.eos_id),
    "bos_id": int(tok.bos_id),
    "step": run.step,
    "mesh": dict(mesh.shape) if mesh else None,
    # The ids every text prompt starts with (a decoder-only model continues after EOS); see `generate`.
    "prompt_prefix": [int(i) for i in adapter.prompt_ids(tok, "")],
  }
  tok.save(out)  # tokenizer.json (+ tokenizer.model): the artifact takes and returns text on its own
  (out / "meta.json").write_text(json.dumps(meta, indent=2))
  return out


class ExportedGenerator(decode.Generator):
  """`decode.Generator`'s streaming loop over the deserialized prefill and step; no model code.

  `generate("text")` takes and returns text with the artifact's own tokenizer; `generate([[ids...]])` and
  `stream` take token ids, as `decode.Generator` does. `tokenizer` is None for artifacts exported
  before tokenizers were saved in them.
  """

  def __init__(self, directory):
    directory = fs.path(directory)  # a local folder or gs://
    for name in ("meta.json", "prefill.bin", "step.bin", "weights.npz"):
      if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name} not found; pass a directory written by `jaxlm export`")
    self.meta = json.loads((directory / "meta.json").read_text())
    self.cfg = SimpleNamespace(family=self.meta["family"], max_len=self.meta["max_len"])
    self.cache_len, self.prompt_len = self.meta["cache_len"], self.meta["prompt_len"]
    # Artifacts written before the key existed: only a prompt kept in the cache makes it longer than max_len + 1.
    self.prompt_in_cache = self.meta.get("prompt_in_cache", self.cache_len > self.meta["max_len"] + 1)
    self._prefill_exported = jax.export.deserialize(bytearray((directory / "prefill.bin").read_bytes()))
    # An artifact traced on a mesh runs on one of the same sizes, its params placed as the program takes them.
    self.mesh = mesh_lib.mesh_of_sizes(self.meta["mesh"]) if self.meta.get("mesh") else None
    with (directory / "weights.npz").open("rb") as file, np.load(file) as weights:
      params = unflatten({k: weights[k] for k in weights.files})
    if self.mesh is None:
      self.params = jax.tree.map(jnp.asarray, params)
    else:
      (param_shardings, *_), _ = jax.tree.unflatten(
        self._prefill_exported.in_tree, self._prefill_exported.in_shardings_jax(self.mesh)
      )
      self.params = jax.device_put(params, param_shardings)
    self._step_exported = jax.export.deserialize(bytearray((directory / "step.bin").read_bytes()))
    self.tokenizer = tokenizer_lib.load(directory) if (directory / "tokenizer.json").is_file() else None

  def prefill(self, params, prompt, sampling, cache_len, do_sample):
    return self._prefill_exported.call(params, prompt, sampling)

  def step(self, params, state, tokens_B, sampling, t, do_sample):
    return self._step_exported.call(params, state, tokens_B, sampling, t)

  def stream(self, prompts, max_new_tokens, sampling=None, stop_ids=(), batch_size=None):
    # The artifact's batch is fixed; fewer prompts are padded with dummy rows.
    return super().stream(
      prompts, max_new_tokens, sampling or decode.Sampling(temperature=0.0), stop_ids, self.meta["batch_size"]
    )

  def generate(
    self,
    prompts,
    max_new_tokens: int | Sequence[int] = 64,
    sampling: decode.Sampling = None,
    stop_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
  ):
    """Text in, text out, or token ids in, token ids out.

    prompts: a str (returns a str), a list of str (returns a list of str), or a list of token-id lists
      (returns the new ids of each, stop tokens excluded; the ids go in as given).
    Text prompts start with the model's prefix (`meta['prompt_prefix']`: EOS for a decoder-only model,
    as its training texts do) and are encoded by the artifact's tokenizer; generation stops at EOS
    unless `stop_ids` says otherwise. Ids stop only at `stop_ids` (default none).
    """
    if isinstance(prompts, str):
      return self.generate([prompts], max_new_tokens, sampling, stop_ids, batch_size)[0]
    if not prompts or not all(isinstance(p, str) for p in prompts):
      return super().generate(prompts, max_new_tokens, sampling, stop_ids or (), batch_size)
    if self.tokenizer is None:
      raise decode.DecodeError(
        "this artifact holds no tokenizer (exported by an older jaxlm): pass token ids, "
        "or export it again with `jaxlm export`"
      )
    prefix = list(self.meta["prompt_prefix"])
    ids = [prefix + [int(i) for i in self.tokenizer.encode(p)] for p in prompts]
    stop = [self.meta["eos_id"]] if stop_ids is None else stop_ids
    return [self.tokenizer.decode(new) for new in super().generate(ids, max_new_tokens, sampling, stop, batch_size)]


def load(directory) -> ExportedGenerator:
  """The artifact `jaxlm export` wrote in `directory` (local or gs://): `load(d).generate("def f")` -> text."""
  return ExportedGenerator(directory)
