#!/usr/bin/env bash
# The machine's f32 FMA peak in GFLOP/s (scripts/fma_peak.c), the reference for "share of the
# peak" figures in docs/performance.md: on 1 thread and on THREADS (default: all cores).
# Median of RUNS runs each (default 3). Needs a C compiler (cc) with pthreads. Not in CI.
#
# Usage: scripts/fma_peak.sh [THREADS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")"
threads="${1:-$(nproc)}"
runs="${2:-3}"
flags="-mavx2 -mfma"
grep -qw avx512f /proc/cpuinfo && flags="-mavx512f -mfma"
bin="$(mktemp)"
trap 'rm -f "$bin"' EXIT
cc -O2 $flags -o "$bin" fma_peak.c -lpthread
for n in 1 "$threads"; do
    for _ in $(seq "$runs"); do "$bin" "$n"; done | sort -t: -k2 -g | sed -n "$(( (runs + 1) / 2 ))p"
done
