"""`jaxlm plot` and the trainer's RUN/loss.png: the figure's panels, lines per run, labels and the PNG."""

import json
import math
import sys

import pytest

pytest.importorskip("matplotlib")

from jaxlm.cli import main  # noqa: E402
from jaxlm.training import plot


def fake_run(
  directory,
  steps: int = 60,
  eval_every: int = 20,
  batch: int = 8,
  seq_len: int = 32,
  offset=0.0,
  resumed_at: int | None = None,
):
  """A run folder with config.json and the metrics.jsonl rows `jaxlm train` writes (train rows every step,
  validation rows every `eval_every`); `resumed_at` logs the steps after it twice, as a resumed run does."""
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(
    json.dumps({"train": {"global_batch_size": batch}, "data": {"seq_len": seq_len}})
  )
  rows = []
  for step in list(range(1, steps + 1)) + list(range((resumed_at or steps) + 1, steps + 1)):
    rows.append(
      {
        "step": step,
        "loss": 5.5 * math.exp(-step / 30) + 1 + offset,
        "learning_rate": 1e-3 * min(1, step / 10),
        "grad_norm": 2.0 / step**0.5,
        "tokens": batch * seq_len,
        "tokens_per_s": 900.0 + step,
      }
    )
    if step % eval_every == 0:
      rows.append({"step": step, "val_loss": 5.5 * math.exp(-step / 30) + 1.2 + offset})
  (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return directory


def test_figure_overlays_runs_with_one_line_per_metric_and_run(tmp_path):
  runs = [
    fake_run(tmp_path / "baseline"),
    fake_run(tmp_path / "ablation", offset=0.3, resumed_at=40),
    fake_run(tmp_path / "no_eval", eval_every=10**6),
  ]
  fig = plot.figure(runs)
  axes = fig.axes
  assert [ax.get_title() for ax in axes[:5]] == [title for title, *_ in plot.PANELS]
  # Loss panels: train + validation per run that evaluated (2 + 2 + 1); the others one line per run.
  assert [len(ax.get_lines()) for ax in axes[:5]] == [5, 5, 3, 3, 3]
  assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes[:5])
  assert axes[1].get_xlabel() == "tokens" and axes[3].get_yscale() == "log"
  # Loss on a log scale: the first steps' loss (5.5 + 1 here) does not flatten the rest (1.2 to 1.7) to a line.
  assert axes[0].get_yscale() == axes[1].get_yscale() == "log"
  # Runs are told apart by colour; validation by dashes.
  loss_lines = axes[0].get_lines()
  assert len({line.get_color() for line in loss_lines}) == 3
  assert [line.get_linestyle() for line in loss_lines[:2]] == ["-", "--"]
  # The resumed run's repeated steps are plotted once, in order: the curve never doubles back.
  ablation_steps = list(loss_lines[2].get_xdata())
  assert ablation_steps == sorted(ablation_steps) == list(range(1, 61))
  assert list(axes[1].get_lines()[0].get_xdata())[:2] == [256, 512]  # steps x batch 8 x seq_len 32
  assert [t.get_text() for t in axes[5].get_legend().get_texts()][:3] == ["baseline", "ablation", "no_eval"]


def test_cli_writes_the_png_and_names_a_missing_run(tmp_path, capsys):
  runs = [fake_run(tmp_path / "a" / "run"), fake_run(tmp_path / "b" / "run", offset=0.2)]
  out = tmp_path / "loss.png"
  assert main.main(["plot", *map(str, runs), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_mode & 0o044 == 0o044
  # Two runs both called 'run': the legend shows their paths instead.
  assert plot._labels(runs) == [str(r) for r in runs]
  assert main.main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
  assert "missing/metrics.jsonl not found" in capsys.readouterr().err


def test_write_run_plot_skips_a_run_without_rows_and_tolerates_a_half_written_line(tmp_path):
  run = fake_run(tmp_path / "run")
  assert plot.write_run_plot(tmp_path / "nothing") is None
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 61, "lo')  # the trainer is mid-write
  assert plot.write_run_plot(run) == str(run / "loss.png") and (run / "loss.png").stat().st_size > 10_000


def test_without_matplotlib_the_fix_is_the_checkout_install(tmp_path, monkeypatch, capsys):
  run = fake_run(tmp_path / "run")
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
  assert main.main(["plot", str(run), "--out", str(tmp_path / "loss.png")]) == 2
  assert "plotting needs matplotlib: pip install -e '.[plot]' in the jaxlm checkout" in capsys.readouterr().err
  assert plot.write_run_plot(run) is None and not (run / "loss.png").exists()
