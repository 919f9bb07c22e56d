#!/usr/bin/env bash
# Two retort binaries side by side on the SmolLM2 steps: each round runs A then B, both
# `retort run examples/configs/smollm2_distill.toml` with the baseline phase on, so that one run
# times the KD step (`student` phase) and the CE-only step (`baseline` phase); median ms/step of
# the steps after each phase's first (scripts/step_ms.py). For what a change bought: build the
# old commit in a worktree with its own target dir, e.g.
#   git worktree add /tmp/old <rev> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p retort-host)
#   scripts/bench_ab.sh /tmp/old-target/release/retort target/release/retort 3 5
#
# Usage: scripts/bench_ab.sh A_BIN B_BIN [ROUNDS] [STEPS]   (defaults 3 5)
#   SHAPES="4x64 8x256"   the batch x seq shapes
# Needs models/ (scripts/fetch_smollm2.sh) and ../shared/data/tinyshakespeare.txt. Not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 A_BIN B_BIN [ROUNDS] [STEPS]" >&2; exit 2; }
a="$1"
b="$2"
rounds="${3:-3}"
steps="${4:-5}"
shapes="${SHAPES:-4x64 8x256}"
for bin in "$a" "$b"; do
    [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
done
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] || { echo "no model: run scripts/fetch_smollm2.sh" >&2; exit 2; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for shape in $shapes; do
    bs="${shape%x*}"
    seq="${shape#*x}"
    for r in $(seq "$rounds"); do
        for side in A B; do
            bin="$a"
            [ "$side" = B ] && bin="$b"
            dir="$out/$shape-$r-$side"
            "$bin" run examples/configs/smollm2_distill.toml --out "$dir" \
                --set train.batch_size="$bs" --set train.seq_len="$seq" --set train.steps="$((steps + 1))" \
                --set train.log_every=1 --set train.eval_every=0 --set eval.batches=1 \
                --set eval.baseline=true >"$dir.log" 2>&1 || { echo "$side failed:" >&2; tail -5 "$dir.log" >&2; exit 1; }
            echo "$shape round $r $side: KD $(python3 scripts/step_ms.py "$dir/metrics.jsonl" student) ms/step," \
                "CE $(python3 scripts/step_ms.py "$dir/metrics.jsonl" baseline) ms/step"
        done
    done
done
