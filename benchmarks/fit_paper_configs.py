"""Does every paper config fit the TPU slice its docstring names, as written? `jaxlm compile` on each.

    python benchmarks/fit_paper_configs.py --out fit.jsonl [--only gpt2_small,llama_7b] [--timeout 3600]
    python benchmarks/fit_paper_configs.py --list     # the cases, without compiling

A paper config (one with PAPER_PARAMS) names its slices on its docstring's `Hardware:` line (v4-32,
v5e-8, v5p-256...). Each (config, slice) pair is compiled, smallest model first, each in a fresh process
(libtpu, no TPU) with no overrides, and its `jaxlm compile --json` report is appended to --out as it
finishes, so a long sweep keeps what it has; run again with the same --out, it compiles only the cases
not recorded there yet. Exit status 0 when every case fits.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxlm.training import chips  # noqa: E402  (the slice table, to tell a slice from other words)


def cases() -> list[tuple[str, str, float]]:
  """(config name, slice, paper parameters) for every paper config and slice its Hardware line names."""
  found = []
  for path in sorted((ROOT / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    text = path.read_text()
    params = re.search(r"^PAPER_PARAMS = ([\d.e+]+)", text, re.M)
    hardware = re.search(r"^Hardware:(.*)$", text, re.M)
    if not (spec and params and hardware):
      continue
    for word in re.findall(r"\bv\d[a-z]*(?:-\d+|:\d+(?:x\d+)+)", hardware.group(1)):
      try:
        chips.parse_slice(word)
      except chips.SliceError:
        continue
      found.append((path.stem, word, float(params.group(1))))
  return sorted(found, key=lambda case: (case[2], case[0]))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="fit_paper_configs.jsonl")
  p.add_argument("--only", default="", help="comma-separated config names")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
  p.add_argument("--list", action="store_true")
  args = p.parse_args()
  todo = [c for c in cases() if not args.only or c[0] in args.only.split(",")]
  if args.list:
    for name, topology, params in todo:
      print(f"{name:18s}{topology:12s}{params:10.3g}")
    return 0
  out = Path(args.out)
  recorded = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  failures = sum(not row["fits"] for row in recorded)
  done_before = {(row["config"], row["topology"]) for row in recorded}
  for name, topology, _ in todo:
    if (name, topology) in done_before:
      continue
    with tempfile.TemporaryDirectory() as tmp:
      report_path = Path(tmp) / "report.json"
      command = [sys.executable, "-m", "jaxlm", "compile", "--config", f"configs/{name}.py", "--topology", topology]
      start = time.time()
      try:
        done = subprocess.run(
          [*command, "--json", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=args.timeout
        )
        status, tail = done.returncode, (done.stdout + done.stderr).strip().splitlines()[-3:]
      except subprocess.TimeoutExpired:
        status, tail = "timeout", [f"no result in {args.timeout:.0f} s"]
      report = json.loads(report_path.read_text()) if report_path.exists() else {}
    row = {
      "config": name,
      "topology": topology,
      "status": status,
      "fits": bool(report.get("fits")),
      "wall_s": round(time.time() - start, 1),
      "date": time.strftime("%Y-%m-%d %H:%M"),
      "report": report,
      "tail": tail,
    }
    failures += not row["fits"]
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    peak = report.get("peak_bytes")
    print(
      f"{name:18s}{topology:12s}{'fits' if row['fits'] else 'DOES NOT FIT'}"
      + (f"  peak {peak / 2**30:.2f} / {report['hbm_bytes'] / 2**30:.0f} GiB" if peak else f"  {tail[-1:]}")
      + f"  ({row['wall_s']:.0f} s)",
      flush=True,
    )
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
