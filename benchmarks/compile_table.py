"""The README's TPU table: paper configs compiled ahead of time for the slice one would rent (`jaxlm compile`).

    python benchmarks/compile_table.py --out compile_table.jsonl [--only gpt2_small,llama_7b_v5p_fsdp]
    python benchmarks/compile_table.py --table compile_table.jsonl    # print the markdown table

Every case runs `jaxlm compile` in a fresh process (libtpu, no TPU), one at a
time, and appends its JSON report to --out as it finishes, so a long sweep
keeps what it has. Compute is bfloat16 with float32 master weights (the
presets' default). The estimate columns are jaxlm/training/aot.py's roofline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
T5_BASE = [
  "--config.model.num_layers=12",
  "--config.model.d_model=768",
  "--config.model.num_heads=12",
  "--config.model.mlp_dim=3072",
  "--config.model.dtype=bfloat16",
  "--config.train.global_batch_size=128",
  "--config.data.seq_len=512",
  "--config.data.target_len=512",
  "--config.model.max_len=512",
]

# name -> (config, topology, overrides). The first cases are the README's rows; the llama_7b ones are its sweep.
CASES = {
  "gpt2_small": (
    "gpt2_small",
    "v5e-8",
    FSDP + ["--config.model.remat_policy=full", "--config.train.num_micro_batches=8"],
  ),
  "t5_base": ("transformer_base", "v5e-8", T5_BASE),
  "t5_base_full": (
    "transformer_base",
    "v5e-8",
    T5_BASE + ["--config.model.remat_policy=full", "--config.model.scan_layers=True"],
  ),
  "gpt3_xl": ("gpt3_xl", "v5e-16", FSDP + ["--config.model.remat_policy=full", "--config.train.num_micro_batches=8"]),
  "llama_7b_v5p_fsdp_full": (
    "llama_7b",
    "v5p-32",
    FSDP + ["--config.model.remat_policy=full", "--config.train.num_micro_batches=16"],
  ),
  "llama_7b_v5e_fsdp_full": (
    "llama_7b",
    "v5e-64",
    FSDP + ["--config.model.remat_policy=full", "--config.train.num_micro_batches=32", "--config.eval.batch_size=64"],
  ),
  "llama_7b_v5p_tensor4_full": (
    "llama_7b",
    "v5p-32",
    [
      "--config.mesh.data=1",
      "--config.mesh.fsdp=4",
      "--config.mesh.tensor=4",
      "--config.model.remat_policy=full",
      "--config.train.num_micro_batches=16",
    ],
  ),
  "llama_7b_v5p_fsdp_dots_no_batch": (
    "llama_7b",
    "v5p-32",
    FSDP + ["--config.model.remat_policy=dots_no_batch", "--config.train.num_micro_batches=64"],
  ),
  # d_model 5140 = 4 x 1285 and the vocabulary 50257 = 29 x 1733: fsdp 4 (embed) and no tensor axis.
  "gpt3_13b": (
    "gpt3_13b",
    "v5p-64",
    [
      "--config.mesh.data=8",
      "--config.mesh.fsdp=4",
      "--config.model.remat_policy=full",
      "--config.train.num_micro_batches=16",
      "--config.eval.batch_size=32",
    ],
  ),
  "llama_7b_v5p_fsdp_none": (
    "llama_7b",
    "v5p-32",
    FSDP + ["--config.model.remat_policy=none", "--config.train.num_micro_batches=128"],
  ),
}
# LLaMA-7B serving: bfloat16 weights, tensor parallelism over the slice (kv heads split), --decode.
for chips in (4, 8):
  for rows in (8, 32):
    CASES[f"llama_7b_decode_v5e{chips}_b{rows}"] = (
      "llama_7b",
      f"v5e-{chips}",
      [
        "--decode",
        f"--batch-size={rows}",
        "--config.mesh.data=1",
        "--config.mesh.tensor=-1",
        "--config.model.param_dtype=bfloat16",
      ],
    )


def run(name: str, extra: list[str]) -> dict:
  config, topology, overrides = CASES[name]
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "jaxlm",
        "compile",
        "--config",
        str(ROOT / "configs" / f"{config}.py"),
        "--topology",
        topology,
        "--json",
        out.name,
        *overrides,
        *extra,
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
    )
    report = Path(out.name).read_text()
    if not report:  # exit 0 fits, 1 does not fit; anything else (an exception) wrote no report
      return {"case": name, "config": config, "topology": topology, "error": result.stderr.strip()[-500:]}
    return {"case": name, "config": config, "overrides": overrides, **json.loads(report)}


def decode_table(rows: list[dict]) -> str:
  gib = 1024**3
  lines = [
    "| case | slice | mesh (data x fsdp x tensor) | batch | per chip: weights | KV cache | decode-step peak / HBM | "
    "fits | est. tokens/s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    mesh = " x ".join(str(v) for v in r["mesh"].values())
    peak = f"{r['step']['peak_bytes'] / gib:.1f}" if "step" in r else "-"
    lines.append(
      f"| {r['case']} | {r['topology']} | {mesh} | {r['batch_size']} | {r['params_bytes'] / gib:.2f} GiB | "
      f"{r['cache_bytes'] / gib:.2f} GiB | {peak} / {r['hbm_bytes'] / gib:.0f} GiB | "
      f"{'yes' if r['fits'] else 'no'} | {r['tokens_per_s']:,.0f} |"
    )
  return "\n".join(lines)


def table(rows: list[dict]) -> str:
  decoding = [r for r in rows if "cache_bytes" in r]
  rows = [r for r in rows if "cache_bytes" not in r]
  if decoding:
    return "\n\n".join(filter(None, [table(rows) if rows else "", decode_table(decoding)]))
  gib = 1024**3
  lines = [
    "| case | slice | mesh (data x fsdp x tensor) | remat | batch / micro | per chip: params + opt | "
    "temporaries | peak / HBM | fits | compile | est. MFU (bound) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r and "mesh" not in r:
      lines.append(f"| {r['case']} | {r['topology']} | failed: {r['error'][:80]} |||||||||")
      continue
    mesh = " x ".join(str(v) for v in r["mesh"].values())
    head = (
      f"| {r['case']} | {r['topology']} | {mesh} | {r['remat_policy']} | "
      f"{r['global_batch_size']} / {r['num_micro_batches']} |"
    )
    if "peak_bytes" not in r:
      lines.append(f"{head} | | | no | {r['compile_s']:.0f} s | - |")
      continue
    lines.append(
      f"{head} {(r['params_bytes'] + r['optimizer_bytes']) / gib:.2f} GiB | {r['temp_bytes'] / gib:.2f} GiB | "
      f"{r['peak_bytes'] / gib:.1f} / {r['hbm_bytes'] / gib:.0f} GiB | {'yes' if r['fits'] else 'no'} | "
      f"{r['compile_s']:.0f} s | {100 * r['mfu']:.0f}% ({r['bound']}) |"
    )
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="compile_table.jsonl")
  p.add_argument("--only", default="", help="comma-separated case names (default: all, in order)")
  p.add_argument("--table", default="", help="print the markdown table of a results file and exit")
  args, extra = p.parse_known_args(argv)
  if args.table:
    print(table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
    return
  for name in args.only.split(",") if args.only else CASES:
    row = run(name, extra)
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    print(table([row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
