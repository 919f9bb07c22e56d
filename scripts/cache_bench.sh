#!/usr/bin/env bash
# Logit cache figures on a real teacher: size (bytes/token), coding fidelity, read throughput
# for k = 16, 64, 128, next to the seed design (HDF5, fp32 values + int64 ids, gzip).
#
# Usage: scripts/cache_bench.sh CONFIG OUT_DIR [--set KEY=VALUE]...
#   CONFIG   a run config whose teacher has a checkpoint (e.g. examples/configs/smollm2_distill.toml)
#   OUT_DIR  where the caches go (the f32 top-128 cache is reused if already complete)
# Steps: one teacher pass writes an exact (f32) top-128 cache; `retort cache recode` derives the
# sqrt-coded caches for k = 16, 64, 128 from it without the teacher (a build with the same
# options writes the same bytes); `retort cache inspect --bench-read --config CONFIG` reports
# size, read throughput and fidelity against the live teacher; with numpy + h5py importable by
# $PYTHON (default python3), scripts/seed_cache_size.py measures the seed design on the same
# exported top-k. Never run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; out="$2"; shift 2
sets=("$@")
py="${PYTHON:-python3}"
cargo build --release -q -p retort-host
bin=target/release/retort
mkdir -p "$out"
"$bin" cache "$config" "${sets[@]}" --out "$out/f32_k128" --k 128 --values f32
for k in 16 64 128; do
  "$bin" cache recode "$out/f32_k128" --out "$out/sqrt_k$k" --k "$k" --force
  "$bin" cache inspect "$out/sqrt_k$k" --bench-read --config "$config" "${sets[@]}"
done
if "$py" -c "import h5py, numpy" 2>/dev/null; then
  "$bin" cache export "$out/f32_k128" --out "$out/export" --split train --force
  "$py" scripts/seed_cache_size.py "$out/export"
else
  echo "note: $py cannot import numpy and h5py; skipping the seed-design measurement" >&2
fi
