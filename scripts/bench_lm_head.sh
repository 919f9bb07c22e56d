#!/usr/bin/env bash
# The loss region of a KD step (0.7 kl(T=2) + 0.3 ce, the teacher's logits made from its hidden
# states and head inside the region) fused with the LM head or not, at the shapes of
# docs/performance.md: median time of R repetitions and the region's peak resident set, one
# process per configuration. Usage: scripts/bench_lm_head.sh [R] (default 3). Not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-3}"
cargo build --release -q -p retort-plugins --example lm_head_memory
bin=target/release/examples/lm_head_memory
for shape in "2048 576 49152" "4096 576 49152" "2048 2048 128256"; do
  for mode in --unfused --fused; do
    # shellcheck disable=SC2086
    "$bin" $shape $mode --reps "$reps"
  done
done
