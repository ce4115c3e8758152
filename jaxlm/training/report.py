"""What a training run prints before its first step (the banner) and after its last (the summary).

The banner says what is about to run: parameters (embedding and the rest),
FLOPs per token, devices and mesh, how much data the run covers, the
tokenizer, where the config came from, and where checkpoints and logs go. The
summary says how it went: wall time and where it went (compilation,
evaluation, checkpointing), the best and final validation loss, and the
final speed. `train_summary.json` holds the same numbers.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config import Config
from jaxlm.training import flops as metrics_lib

# Exit statuses of `jaxlm train`, so a scheduler can tell "requeue me" from "done":
# 128 + the signal number for SIGINT and SIGTERM, as a shell reports them, and
# EX_TEMPFAIL (sysexits.h: "try again later") for a stop at train.stop_at_step.
EXIT_STATUS = {"finished": 0, "sigint": 130, "sigterm": 143, "stop_at_step": 75}
_ENDINGS = {
  "finished": "finished",
  "sigint": "stopped by SIGINT",
  "sigterm": "stopped by SIGTERM",
  "stop_at_step": "stopped at train.stop_at_step",
}


def parameter_counts(params) -> tuple[int, int]:
  """(all parameters, embedding parameters) of a parameter tree (arrays or shapes); embeddings are the
  leaves named 'embedding' (token, position and token-type tables)."""
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(leaf.shape))
    total += size
    if getattr(path[-1], "key", "") == "embedding":
      embedding += size
  return total, embedding


def data_coverage(rows, start: int, num_steps: int, global_batch: int) -> str:
  """'D documents, T tokens, R rows; the run covers E epochs' for random-access rows (as much as is known)."""
  parts = []
  stream = getattr(rows, "stream", None)  # packed text rows know their documents and tokens
  if stream is not None and len(stream.tokens):
    parts += [f"{int(stream.document_ids[-1]) + 1:,} documents", f"{len(stream.tokens):,} tokens"]
  parts.append(f"{len(rows):,} rows")
  epochs = (num_steps - start) * global_batch / max(len(rows), 1)
  return ", ".join(parts) + f"; steps {start + 1}-{num_steps} cover {epochs:.3g} epochs"


def overrides_that_differ(config_file: str, overrides: list[str], config: Config) -> list[str]:
  """The `--config.KEY=VALUE` overrides whose value differs from what `config_file` sets, as 'KEY=VALUE'."""
  base = config_lib.load_config_file(config_file)
  changed = []
  for override in overrides:
    key = override[len("--config.") :].split("=", 1)[0]
    node_base, node = base, config
    for part in key.split("."):
      node_base, node = node_base[part], node[part]
    if node_base != node:
      changed.append(f"{key}={node!r}")
  return changed


def banner(trainer, start: int, rows, origin: str = "") -> list[str]:
  """The lines printed before the first step of `trainer` (a `jaxlm.training.trainer.Trainer`, set up)."""
  config, s = trainer.config, trainer.setup
  total, embedding = parameter_counts(s.abstract_state.params)
  flops = metrics_lib.flops_per_token(config.model, config.data.seq_len)
  devices = jax.devices()
  mesh = " x ".join(f"{name} {size}" for name, size in s.mesh.shape.items())
  inactive = metrics_lib.inactive_params(config.model)  # MoE: the experts a token skips
  active = f", {total - inactive:,} active per token" if inactive else ""
  lines = [
    f"model: {total:,} parameters ({embedding:,} embedding, {total - embedding:,} other{active}), "
    f"{flops / 1e6:,.1f} MFLOP per token",
    f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es)); mesh {mesh}",
  ]
  if rows is not None:
    lines.append(
      f"data: {config.data.source if trainer.train_data is None else 'given to Trainer'}: "
      + data_coverage(rows, start, config.train.num_steps, config.train.global_batch_size)
    )
  if trainer.peak is not None:
    lines.append(f"MFU is relative to {trainer.peak.label}")
  tokenizer = trainer.tokenizer
  lines.append(f"tokenizer: {type(tokenizer).__name__}, {tokenizer.vocab_size} ids")
  if origin:
    lines.append(f"config: {origin}")
  lines.append(f"writing to {trainer.workdir}: checkpoints/, metrics.jsonl, tensorboard/, train_summary.json")
  return lines


def summary_lines(summary: dict) -> list[str]:
  """The lines printed after the last step, from the `train_summary.json` dict."""
  minutes = lambda seconds: f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
  lines = [
    f"{_ENDINGS[summary['stop_reason']]} at step {summary['step']} after {minutes(summary['wall_time_s'])}"
    + (f" over {summary['segments']} runs of the command" if summary.get("segments", 1) > 1 else "")
    + ": "
    f"compile {minutes(summary['compile_time_s'])}, evaluation {minutes(summary['eval_time_s'])}, "
    f"checkpoints {minutes(summary['checkpoint_time_s'])}"
  ]
  if summary.get("final_val_loss") is not None:
    lines.append(
      f"validation loss: final {summary['final_val_loss']:.4f}, best {summary['best_val_loss']:.4f} "
      f"(step {summary['best_val_step']})"
    )
  if "tokens_per_s" in summary:
    mfu = summary.get("mfu", math.nan)
    relative_to = f" of {summary['mfu_peak']}" if "mfu_peak" in summary else ""
    lines.append(f"final speed: {summary['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%}{relative_to}")
  return lines
