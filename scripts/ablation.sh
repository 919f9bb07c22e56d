#!/usr/bin/env bash
# Loss ablation on Tiny Shakespeare: the same student, budget, seed and teacher for every row.
# Usage: scripts/ablation.sh [TEACHER_DIR] [OUT_DIR]
#   TEACHER_DIR: a pretrained teacher (default: runs/shakespeare_char/teacher, written by
#   `cargo run --release -- run examples/configs/shakespeare_char.toml`).
set -euo pipefail
cd "$(dirname "$0")/.."
teacher="${1:-runs/shakespeare_char/teacher}"
out="${2:-runs/ablation}"
data="${DATA:-../shared/data/tinyshakespeare.txt}"
bin=target/release/retort
cargo build --release -q
[ -f "$teacher/model.safetensors" ] || { echo "no teacher at $teacher: run examples/configs/shakespeare_char.toml first" >&2; exit 2; }
declare -A losses=(
  [ce]='[{kind="ce"}]'
  [kl]='[{kind="kl",weight=0.5,temperature=2.0},{kind="ce",weight=0.5}]'
  [reverse_kl]='[{kind="reverse_kl",weight=0.5,temperature=1.0},{kind="ce",weight=0.5}]'
  [jsd]='[{kind="jsd",weight=0.5,beta=0.5},{kind="ce",weight=0.5}]'
  [topk_kl_k8]='[{kind="topk_kl",weight=0.5,k=8},{kind="ce",weight=0.5}]'
  [kl_features]='[{kind="kl",weight=0.5,temperature=2.0},{kind="ce",weight=0.5},{kind="hidden_mse",weight=0.1,map="uniform"},{kind="attention",weight=0.05}]'
)
order=(ce kl reverse_kl jsd topk_kl_k8 kl_features)
mkdir -p "$out"
for name in "${order[@]}"; do
  "$bin" run examples/configs/shakespeare_char.toml --quiet --force --out "$out/$name" \
    --set "data.path=\"$data\"" --set "teacher.checkpoint=\"$teacher\"" \
    --set eval.baseline=false --set "loss=${losses[$name]}" >"$out/$name.log" 2>&1
done
python3 - "$out" "${order[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print("| objective | student val loss | gap to teacher | top-1 agree | KL(teacher‖student) | wall s |")
print("|---|---:|---:|---:|---:|---:|")
for n in names:
    r = json.load(open(f"{out}/{n}/report.json"))
    s = r["student"]
    print(f"| {n} | {s['val_loss']:.4f} | {s['gap_to_teacher']:.4f} | {s['top1_agreement']:.3f} | {s['kl_to_teacher']:.4f} | {r['train']['wall_s']:.1f} |")
print(f"\nteacher val loss {r['teacher']['val_loss']:.4f} ({r['teacher']['description']})")
PY
