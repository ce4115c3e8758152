"""Pictures of training runs: `jaxlm plot RUN [RUN ...] --out loss.png`, and `RUN/loss.png` at each eval.

One figure, five panels, every run overlaid in its own colour: training
(solid) and validation (dashed, dots) loss against steps and against tokens;
the learning rate; the gradient norm (log scale); and tokens per second. A
sixth panel is the legend, so no curve is hidden under it. The numbers come
from each run's `metrics.jsonl`; a step logged twice (a resumed run logs the
steps after its checkpoint again) keeps its last value, so curves never
double back. Tokens are steps x `train.global_batch_size` x `data.seq_len`
from the run's `config.json` (padding included).

matplotlib is an optional dependency (`pip install -e '.[plot]'` in the jaxlm checkout). The
figure is built with `matplotlib.figure.Figure` and no pyplot, so plotting
changes no process-wide state (no backend switch, no global figure list).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Sequence

from jaxlm.errors import JaxlmError
from jaxlm.storage import fs, run_dir

# Loss on a log scale: the first steps' loss (ln of the vocabulary, 5.6 for bytes) is several times the rest, and
# on a linear axis it squeezes the curve that matters into the bottom few pixels.
PANELS = (  # (title, metrics key, x axis, y label, y scale)
  ("loss against steps", "loss", "step", "loss (nats/token, log scale)", "log"),
  ("loss against tokens", "loss", "tokens", "loss (nats/token, log scale)", "log"),
  ("learning rate", "learning_rate", "step", "learning rate", "linear"),
  ("gradient norm", "grad_norm", "step", "global gradient norm", "log"),
  ("throughput", "tokens_per_s", "step", "tokens/s", "linear"),
)
TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.4}
VALIDATION_STYLE = {"linestyle": "--", "marker": "o", "markersize": 3, "linewidth": 1.4}


# jaxlm installs from its checkout (README.md), not from a package index.
INSTALL = "pip install -e '.[plot]' in the jaxlm checkout"


def available() -> bool:
  """Whether matplotlib can be imported, without importing it."""
  return importlib.util.find_spec("matplotlib") is not None


class PlotError(JaxlmError, ValueError):
  """A run that cannot be plotted (no metrics yet) or matplotlib missing; one line naming the file or fix."""


def read_metrics(workdir) -> dict[str, dict[int, float]]:
  """{metric name: {step: value}} from `workdir/metrics.jsonl`; a repeated step keeps its last value."""
  location = fs.join(workdir, "metrics.jsonl")
  if not fs.path(location).exists():
    raise PlotError(f"{location} not found; pass the --workdir of a run that `jaxlm train` has logged to")
  series: dict[str, dict[int, float]] = {}
  lines = fs.read_bytes(location).decode("utf-8", errors="replace").splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row.pop("step"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
      if number == len(lines):
        continue  # the last line, still being written by a running `jaxlm train`
      raise PlotError(f"{location}:{number} is not a metrics row (JSON with a 'step'); was it edited?") from None
    for key, value in row.items():
      if isinstance(value, (int, float)):
        series.setdefault(key, {})[step] = float(value)
  if not series:
    raise PlotError(f"{location} has no metrics rows yet; plot after the run's first logged step")
  return series


def tokens_per_step(workdir) -> int:
  """Tokens one step consumes: `train.global_batch_size` x `data.seq_len` from the run's config.json."""
  config = json.loads(fs.read_bytes(run_dir.config_path(workdir)))
  return int(config["train"]["global_batch_size"]) * int(config["data"]["seq_len"])


def _labels(workdirs: Sequence) -> list[str]:
  """Each run's folder name, or its whole path where two runs share a folder name."""
  names = [fs.path(w).name for w in workdirs]
  return names if len(set(names)) == len(names) else [os.fspath(w) for w in workdirs]


def figure(workdirs: Sequence, labels: Sequence[str] | None = None):
  """A `matplotlib.figure.Figure` of the runs in `workdirs`, overlaid (panels as in PANELS, then a legend).

  Each panel holds one line per run for its metric, and the loss panels a
  second (validation) line per run that has evaluated.
  """
  try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
  except ImportError:
    raise PlotError(f"plotting needs matplotlib: {INSTALL}") from None
  labels = list(labels or _labels(workdirs))
  fig = Figure(figsize=(15, 8.5), layout="constrained")
  axes = fig.subplots(2, 3).ravel()
  colors = [f"C{i % 10}" for i in range(len(workdirs))]
  for workdir, color in zip(workdirs, colors):
    series = read_metrics(workdir)
    scale = {"step": 1, "tokens": tokens_per_step(workdir)}
    for ax, (_, key, x_axis, _, _) in zip(axes, PANELS):
      curves = [(key, TRAIN_STYLE)] + ([("val_loss", VALIDATION_STYLE)] if key == "loss" else [])
      for name, style in curves:
        points = sorted(series.get(name, {}).items())
        if points or name == key:  # every run keeps one line per metric panel, even an empty one
          ax.plot([s * scale[x_axis] for s, _ in points], [v for _, v in points], color=color, **style)
  for ax, (title, _, x_axis, y_label, y_scale) in zip(axes, PANELS):
    ax.set_title(title)
    ax.set_xlabel("tokens" if x_axis == "tokens" else "step")
    ax.set_ylabel(y_label)
    if y_scale == "log" and any(len(line.get_xdata()) for line in ax.get_lines()):
      ax.set_yscale("log")
      plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2, 3, 4 rather than 2 x 10^0
      ax.yaxis.set_major_formatter(plain)
      ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, alpha=0.3)
  legend = axes[-1]
  legend.axis("off")
  handles = [legend.plot([], [], color=color, label=label, **TRAIN_STYLE)[0] for color, label in zip(colors, labels)]
  handles += [
    legend.plot([], [], color="gray", label=text, **style)[0]
    for text, style in (("training loss", TRAIN_STYLE), ("validation loss", VALIDATION_STYLE))
  ]
  legend.legend(handles=handles, loc="center", frameon=False, title="runs")
  return fig


def write_plot(workdirs: Sequence, out, labels: Sequence[str] | None = None) -> str:
  """Writes the figure of `workdirs` to `out` (PNG, or any format matplotlib knows by the extension)."""
  fig = figure(workdirs, labels)
  buffer = io.BytesIO()
  out = os.fspath(out)
  fig.savefig(buffer, format=Path(out).suffix[1:] or "png", dpi=100)
  _replace(out, buffer.getvalue())
  return out


def write_run_plot(workdir) -> str | None:
  """Writes `workdir/loss.png` (the trainer calls this at each eval); None, and nothing written, without
  matplotlib or before the first metrics row."""
  try:
    return write_plot([workdir], fs.join(workdir, "loss.png"))
  except PlotError:
    return None


def _replace(location: str, data: bytes) -> None:
  """Writes a file in one step, so an image viewer never reads half of it (objects in a bucket already are)."""
  if fs.is_url(location):
    fs.write_bytes(location, data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
  partial = f"{location}.{os.getpid()}.tmp"
  with open(partial, "wb") as f:  # open(), not mkstemp: the file gets the usual mode, not 0600
    f.write(data)
  os.replace(partial, location)
