#!/usr/bin/env bash
# One GPU check on a fresh machine that has only this repository and an NVIDIA driver: installs jaxlm with
# JAX's CUDA 12 build in one step, then runs `jaxlm devices`, benchmarks/gpu_h200.py and a short train and
# eval of configs/default.py, writing what each printed and its results under $OUT.
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#
# Settings (environment):
#   OUT            where the results go (default: gpu_check_out); nothing large is written there
#   PYTHON         the interpreter for the virtual environment (default: python3.11, else python3; needs >= 3.11)
#   VENV           the virtual environment to create or reuse (default: .venv, the README's)
#   BENCH_MINUTES  gpu_h200.py starts no new configuration after this many minutes (default: 4)
#   BENCH_ARGS     more gpu_h200.py flags (default: --models gpt2 --impls cudnn xla --remat none full)
#   TRAIN_STEPS    steps of the short training run (default: 300)
#   RUN            its work directory (default: runs/gpu_check; removed first)
#   Without access to the package index, make a wheel folder elsewhere first
#   (pip download -d wheels '.[cuda12]' on the same Python and platform) and run with
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels, which pip reads itself.
#
# Every step after the install runs even when an earlier one failed; $OUT/steps.tsv has each step's exit
# status and seconds, and the script exits 1 if any failed. Written for a machine lent for about 10 minutes:
# the install takes a few (the CUDA and cuDNN wheels are large), the benchmark BENCH_MINUTES and the
# configuration then in flight, the training run about one more.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_check_out}
VENV=${VENV:-.venv}
BENCH_MINUTES=${BENCH_MINUTES:-4}
BENCH_ARGS=${BENCH_ARGS:---models gpt2 --impls cudnn xla --remat none full}
TRAIN_STEPS=${TRAIN_STEPS:-300}
RUN=${RUN:-runs/gpu_check}
mkdir -p "$OUT"
printf 'step\tstatus\tseconds\n' >"$OUT/steps.tsv"
failed=0

# step NAME LOG COMMAND...: runs COMMAND, its output shown and kept in $OUT/LOG; records the status.
step() {
  local name=$1 log=$2 start status
  shift 2
  echo "== $name: $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$log"
  status=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$OUT/steps.tsv"
  if [ "$status" -ne 0 ]; then
    echo "== $name failed (exit $status); see $OUT/$log"
    failed=1
  fi
  return "$status"
}

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "gpu_check: $PYTHON is older than Python 3.11; set PYTHON to a 3.11 or newer interpreter" >&2
  exit 2
fi
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
  "$PYTHON" --version
  command -v nvidia-smi >/dev/null && nvidia-smi
} >"$OUT/machine.txt" 2>&1

# shellcheck disable=SC2329  # run through step
install() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || return
  "$VENV/bin/pip" install -q -e '.[cuda12]'
}
if ! step install install.log install; then
  exit 1  # nothing else can run
fi

# JAX must find the GPU: a CPU fallback would make every later figure meaningless.
# shellcheck disable=SC2329  # run through step
gpu_found() {
  "$VENV/bin/jaxlm" devices --config configs/default.py --json "$OUT/devices.json" || return
  "$VENV/bin/python" -c '
import json, sys
platform = json.load(open(sys.argv[1]))["platform"]
if platform != "gpu":
  sys.exit(f"gpu_check: JAX runs on {platform}, not on a GPU; see the lines above")
' "$OUT/devices.json"
}
if step devices devices.txt gpu_found; then
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  step benchmark gpu_h200.txt "$VENV/bin/python" benchmarks/gpu_h200.py --json "$OUT/gpu_h200.json" \
    --max-minutes "$BENCH_MINUTES" $BENCH_ARGS
  rm -rf "$RUN"
  step train train.txt "$VENV/bin/jaxlm" train --config configs/default.py --workdir "$RUN" \
    --config.train.num_steps="$TRAIN_STEPS" --config.train.eval_every="$TRAIN_STEPS" \
    --config.train.checkpoint_every="$TRAIN_STEPS" --config.train.log_every=50
  step eval eval.txt "$VENV/bin/jaxlm" eval --workdir "$RUN" --max-batches 50
  cp "$RUN/metrics.jsonl" "$RUN/train_summary.json" "$RUN/config.json" "$OUT/" 2>/dev/null
fi

column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
exit "$failed"
