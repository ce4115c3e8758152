"""Orbax checkpoints: async saves, keep-last-K, and restores onto any mesh.

A checkpoint holds two items: `state` (step, params, optimizer state) and
`meta` (the resolved config and the data position). Restores always pass
target shardings built for the current mesh, because Orbax otherwise tries
the saved topology and fails or runs out of memory on another device count.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def _abspath(directory) -> Path:
  return Path(directory).absolute()


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with jaxlm's two items."""

  def __init__(self, directory, keep: int = 3, read_only: bool = False):
    self.directory = _abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def incomplete(self) -> list[Path]:
    """Step folders an interrupted save left behind; Orbax ignores them."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts an async save; every process must call it (Orbax coordinates them)."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target, partial: bool = False):
    """Restores `state` into `target`, a tree of `jax.ShapeDtypeStruct` with shardings.

    With `partial=True` only the subtrees present in `target` are read (for
    example params alone, for evaluation), so the optimizer state never
    occupies memory.
    """
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial)))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this model: "
                            f"{str(e).splitlines()[0][:300]}") from None
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
