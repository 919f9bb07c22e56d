#!/usr/bin/env bash
# The SmolLM2 KD step (examples/configs/smollm2_distill.toml: 30-block Q4_1 teacher dequantized,
# 4-block student) at batch 8 x 256, with the logit terms fused with the LM head and without
# (train.lm_head.fused), alternating, ROUNDS rounds: per run the median tokens/s of the train
# records after the first, and the process's peak resident set. Needs models/ (see
# scripts/fetch_smollm2.sh) and ../shared/data/tinyshakespeare.txt. Not run in CI.
# Usage: scripts/bench_lm_head_step.sh [ROUNDS] [STEPS]   (defaults 2, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
steps="${2:-5}"
cargo build --release -q
out="$(mktemp -d)"
for round in $(seq 1 "$rounds"); do
  for fused in true false; do
    dir="$out/r$round-$fused"
    /usr/bin/time -f "%M" -o "$dir.rss" target/release/retort run examples/configs/smollm2_distill.toml \
      --out "$dir" --set train.batch_size=8 --set train.seq_len=256 --set train.steps="$steps" \
      --set train.log_every=1 --set eval.baseline=false --set eval.batches=1 \
      --set train.lm_head.fused="$fused" >/dev/null 2>&1
    python3 - "$dir/metrics.jsonl" "$(cat "$dir.rss")" "$fused" "$round" <<'PY'
import json, statistics, sys
path, rss_kib, fused, rnd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
recs = [json.loads(l) for l in open(path)]
tps = [r["tokens_per_s"] for r in recs if r.get("event") == "train" and r.get("phase") == "student"][1:]
print(f"round {rnd} fused={fused}: tokens/s median {statistics.median(tps):.1f} "
      f"(steps 2..: {', '.join(f'{x:.1f}' for x in tps)}), peak RSS {rss_kib / 1024:.0f} MiB")
PY
  done
done
