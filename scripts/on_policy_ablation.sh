#!/usr/bin/env bash
# On-policy against off-policy distillation on the quickstart's synthetic source, whose true
# distribution scores what the students generate (docs/on_policy.md, "Evidence").
#
# Usage: scripts/on_policy_ablation.sh [OUT] [STEPS] [PROMPTS]
#   (defaults runs/on_policy_ablation, 2000 steps, 300 validation prompts)
# One teacher is pretrained (the quickstart's) and shared. For each objective (kl and
# reverse_kl at T = 1, alone), three students: off-policy (lambda = 0), GKD lambda = 0.5 and
# lambda = 1, prompts of 32 tokens continued by 33 sampled ones. The off-policy student trains
# STEPS steps; each on-policy student gets the same wall-clock budget of training (its steps
# estimated from a 40-step pilot, then corrected once by the ratio of train wall times). Every
# student continues the same PROMPTS validation prompts; the table gives the true NLL of those
# samples under the source, the teacher's NLL of them and the validation loss.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/on_policy_ablation}"
steps="${2:-2000}"
prompts="${3:-300}"
bin=target/release/retort
cargo build --release -q
mkdir -p "$out"
if [ ! -f "$out/teacher_run/teacher/model.safetensors" ]; then
  "$bin" run examples/configs/quickstart.toml --quiet --force --out "$out/teacher_run" \
    --set eval.baseline=false --set train.steps=1 >"$out/teacher_run.log" 2>&1
fi
teacher="$out/teacher_run/teacher"
declare -A losses=(
  [kl]='[{kind="kl",temperature=1.0}]'
  [reverse_kl]='[{kind="reverse_kl",temperature=1.0}]'
)
common=(--quiet --force --set "teacher.checkpoint=\"$teacher\"" --set eval.baseline=false
  --set "eval.generation={prompts=$prompts}" --set on_policy.prompt_tokens=32
  --set on_policy.compare_off_policy=false --set train.checkpoint_every=0)
run() { # name objective lambda steps
  "$bin" run examples/configs/quickstart.toml --out "$out/$1" "${common[@]}" \
    --set "loss=${losses[$2]}" --set "on_policy.lambda=$3" --set "train.steps=$4" >"$out/$1.log" 2>&1
}
wall() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]+'/report.json'))['train']['wall_s'])" "$1"; }
per_step() { python3 -c "import json,sys; t=json.load(open(sys.argv[1]+'/report.json'))['train']; print(t['wall_s']/t['steps'])" "$1"; }
for obj in kl reverse_kl; do
  run "${obj}_off" "$obj" 0.0 "$steps"
  base=$(per_step "$out/${obj}_off")
  for lambda in 0.5 1.0; do
    # A 40-step pilot estimates the steps; one run at the estimate corrects it by the ratio of
    # train wall times; the final run takes the corrected number.
    run "${obj}_pilot_$lambda" "$obj" "$lambda" 40
    s=$(python3 -c "print(max(1, round($steps * $base / $(per_step "$out/${obj}_pilot_$lambda"))))")
    run "${obj}_on_$lambda" "$obj" "$lambda" "$s"
    s=$(python3 -c "print(max(1, round($s * $(wall "$out/${obj}_off") / $(wall "$out/${obj}_on_$lambda"))))")
    run "${obj}_on_$lambda" "$obj" "$lambda" "$s"
  done
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("| objective | students' data | steps | train wall s | true NLL of samples | teacher NLL of samples | val loss |")
print("|---|---|---:|---:|---:|---:|---:|")
t = json.load(open(f"{out}/kl_off/report.json"))["teacher"]
g = t["generation"]
print(f"| (teacher) | - | - | - | {g['true_nll']:.4f} | {g['teacher_nll']:.4f} | {t['val_loss']:.4f} |")
for obj in ["kl", "reverse_kl"]:
    for name, label in [("off", "off-policy"), ("on_0.5", "GKD lambda 0.5"), ("on_1.0", "on-policy lambda 1")]:
        r = json.load(open(f"{out}/{obj}_{name}/report.json"))
        s, g = r["student"], r["student"]["generation"]
        print(f"| {obj} | {label} | {r['train']['steps']} | {r['train']['wall_s']:.1f} | "
              f"{g['true_nll']:.4f} | {g['teacher_nll']:.4f} | {s['val_loss']:.4f} |")
PY
