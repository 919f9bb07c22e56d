#!/usr/bin/env bash
# retort's reference KD step against PyTorch eager on the same machine, back to back.
# Shapes (both sides): teacher 4L/128, student 2L/64, 4 heads, vocab 65, block 128, batch 16,
# GELU (tanh); one step = teacher fwd (no grad) + student fwd + 0.5 CE + 0.5 T^2 KL (T = 2)
# + backward + AdamW + reading the loss back.
#
# Usage: scripts/bench_vs_torch.sh [ROUNDS] [STEPS]      (defaults 5 rounds of 20 steps)
#   PYTHON=/path/to/python   an interpreter with torch (default: python3)
#   TORCH_REF=...            the PyTorch script (default ../shared/bench/torch_kd_reference.py)
#   CANDLE_NUM_THREADS=N     candle's thread count (default: all cores, like torch's 2 threads)
#   FEATURES=blas            cargo features for the retort build (blas: OpenBLAS matmuls,
#                            needs libopenblas-dev)
#   RETORT_KD_STEP=PATH      another build of the kd_step example (e.g. of an older commit)
#   RETORT_KD_STEP_BEFORE=PATH  also time this build in every round, before the others, and
#                            print before/after (a change measured side by side in one series)
#   TORCH_THREADS=N          override the reference script's torch.set_num_threads(2)
#   MODE=train               time the teacher (4L/128) trained alone with cross-entropy on both
#                            sides (the reference script's `train` mode) instead of the KD step
# Each round runs retort then torch (20 steps after 3 warm-up steps each); the script prints
# every round's median ms/step, the median over rounds, and torch/retort throughput ratio
# (> 1 means retort is faster). Without torch it reports retort alone. docs/performance.md
# says how to install torch; CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
mode="${MODE:-kd}"
steps="${2:-20}"
py="${PYTHON:-python3}"
ref="${TORCH_REF:-../shared/bench/torch_kd_reference.py}"
[ -n "${RETORT_KD_STEP:-}" ] || cargo build --release -q -p retort-host --example kd_step ${FEATURES:+--features "$FEATURES"}
bin="${RETORT_KD_STEP:-target/release/examples/kd_step}"
have_torch=1
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "note: '$py' cannot import torch; timing retort only (see docs/performance.md)" >&2
  have_torch=0
fi
[ -f "$ref" ] || { echo "no PyTorch reference script at $ref" >&2; have_torch=0; }
before="${RETORT_KD_STEP_BEFORE:-}"
r_ms=(); t_ms=(); b_ms=()
for i in $(seq 1 "$rounds"); do
  if [ -n "$before" ]; then
    out=$(KD_MODE="$mode" "$before" "$steps")
    line=$(head -1 <<<"$out")
    echo "round $i before: $line"
    b_ms+=("$(sed -E 's/.*median ([0-9.]+) ms\/step.*/\1/' <<<"$line")")
  fi
  out=$(KD_MODE="$mode" "$bin" "$steps")
  line=$(head -1 <<<"$out")
  echo "round $i retort: $line"
  echo "round $i retort: $(tail -1 <<<"$out")"
  r_ms+=("$(sed -E 's/.*median ([0-9.]+) ms\/step.*/\1/' <<<"$line")")
  if [ "$have_torch" = 1 ]; then
    if [ -n "${TORCH_THREADS:-}" ]; then
      line=$("$py" -c "import sys, torch
_set = torch.set_num_threads
torch.set_num_threads = lambda n: _set($TORCH_THREADS)
sys.argv = ['$ref', '$mode', '$steps']
exec(open('$ref').read())" | tail -1)
    else
      line=$("$py" "$ref" "$mode" "$steps" | tail -1)
    fi
    echo "round $i torch:  $line"
    t_ms+=("$(sed -E 's/.*median ([0-9.]+) ms\/step.*/\1/' <<<"$line")")
  fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rm=$(median "${r_ms[@]}")
echo "retort median of round medians: $rm ms/step ($(awk -v m="$rm" 'BEGIN{printf "%.0f", 16*128/(m/1000)}') tok/s)"
if [ -n "$before" ]; then
  bm=$(median "${b_ms[@]}")
  echo "before median of round medians: $bm ms/step; after/before time $(awk -v a="$rm" -v b="$bm" 'BEGIN{printf "%.3f", a/b}')"
fi
if [ "$have_torch" = 1 ]; then
  tm=$(median "${t_ms[@]}")
  echo "torch  median of round medians: $tm ms/step ($(awk -v m="$tm" 'BEGIN{printf "%.0f", 16*128/(m/1000)}') tok/s)"
  echo "throughput ratio retort/torch: $(awk -v r="$rm" -v t="$tm" 'BEGIN{printf "%.2f", t/r}')x"
  [ -z "$before" ] || echo "throughput ratio before/torch: $(awk -v r="$bm" -v t="$tm" 'BEGIN{printf "%.2f", t/r}')x"
fi
