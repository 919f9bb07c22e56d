#!/usr/bin/env bash
# The SmolLM2 KD step and the student's CE-only step, retort against Hugging Face transformers +
# PyTorch eager on the same machine, at batch x seq 4 x 64 and 8 x 256 (issue #21's table).
#
# retort: `retort run examples/configs/smollm2_distill.toml` (teacher: the Q4_1 GGUF dequantized,
# student: its blocks 0, 10, 19, 29; 0.7 kl(T=2) + 0.3 ce; AdamW) with the baseline phase on,
# which trains the same student on hard labels: the `student` phase's steps are KD steps, the
# `baseline` phase's CE-only steps. A step's time is the difference of consecutive train
# records' `elapsed_s` (log_every = 1, no evaluation during training), the first step of each
# phase left out. transformers: scripts/transformers_kd_step.py, the same models, loss and
# optimizer, one warm-up step. Each round runs retort, then transformers' KD and CE steps.
#
# Usage: scripts/bench_vs_transformers.sh [ROUNDS] [STEPS]   (defaults 2 4)
#   PYTHON=/path/to/python   torch, transformers, gguf, accelerate (docs/performance.md,
#                            "Installing PyTorch"); without it retort runs alone
#   SHAPES="4x64 8x256"      the batch x seq shapes
#   TEACHER=bf16             the teacher in bf16 on both sides (retort: teacher.precision =
#                            "bf16", bf16 products on the AMX tiles where the CPU has them;
#                            transformers: the teacher cast to torch.bfloat16); the student f32
#   STUDENT=bf16             the student in bf16 mixed precision on both sides (retort:
#                            student.dtype = "bf16", f32 master weights with bf16 products on
#                            the AMX tiles; transformers: its forward under CPU autocast bf16)
# Needs models/ (scripts/fetch_smollm2.sh) and ../shared/data/tinyshakespeare.txt. Not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
steps="${2:-4}"
py="${PYTHON:-python3}"
shapes="${SHAPES:-4x64 8x256}"
teacher="${TEACHER:-f32}"
case "$teacher" in
    f32) retort_teacher=(); peer_teacher=float32 ;;
    bf16) retort_teacher=(--set 'teacher.precision="bf16"'); peer_teacher=bfloat16 ;;
    *) echo "TEACHER must be f32 or bf16, not $teacher" >&2; exit 2 ;;
esac
student="${STUDENT:-f32}"
case "$student" in
    f32) retort_student=(); peer_student=float32 ;;
    bf16) retort_student=(--set 'student.dtype="bf16"'); peer_student=bfloat16 ;;
    *) echo "STUDENT must be f32 or bf16, not $student" >&2; exit 2 ;;
esac
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
data=../shared/data/tinyshakespeare.txt
[ -f "$model" ] || { echo "no $model: run scripts/fetch_smollm2.sh" >&2; exit 2; }
[ -f "$data" ] || { echo "no $data" >&2; exit 2; }
cargo build --release -q -p retort-host
peer=false
"$py" -c "import torch, transformers, gguf, accelerate" 2>/dev/null && peer=true
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# Median ms/step of phase $2 in metrics file $1 (steps after the phase's first).
step_ms() { python3 scripts/step_ms.py "$1" "$2"; }

for shape in $shapes; do
    b="${shape%x*}"
    s="${shape#*x}"
    for r in $(seq "$rounds"); do
        dir="$out/$shape-$r"
        target/release/retort run examples/configs/smollm2_distill.toml --out "$dir" \
            --set train.batch_size="$b" --set train.seq_len="$s" --set train.steps="$((steps + 1))" \
            --set train.log_every=1 --set train.eval_every=0 --set eval.batches=1 \
            --set eval.baseline=true "${retort_teacher[@]}" "${retort_student[@]}" >"$dir.log" 2>&1 || { echo "retort failed: $dir.log" >&2; cat "$dir.log" >&2; exit 1; }
        kd=$(step_ms "$dir/metrics.jsonl" student)
        ce=$(step_ms "$dir/metrics.jsonl" baseline)
        echo "$shape round $r: retort KD $kd ms/step, CE $ce ms/step"
        echo "retort kd $shape $kd" >>"$out/all"
        echo "retort ce $shape $ce" >>"$out/all"
        if $peer; then
            for mode in kd ce; do
                ms=$("$py" scripts/transformers_kd_step.py --gguf "$model" --data "$data" --batch "$b" \
                    --seq "$s" --steps "$steps" --mode "$mode" --teacher-dtype "$peer_teacher" --student-dtype "$peer_student" 2>/dev/null |
                    sed -n 's/^transformers .* median: \([0-9.]*\) ms.*/\1/p')
                echo "$shape round $r: transformers ${mode^^} $ms ms/step"
                echo "transformers $mode $shape $ms" >>"$out/all"
            done
        fi
    done
done

python3 - "$out/all" "$peer" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    who, mode, shape, ms = line.split()
    runs[who, mode, shape].append(float(ms))
print("\n| step | batch x seq | retort ms | transformers ms | retort / transformers throughput |")
print("|---|---|---:|---:|---:|")
for (who, mode, shape), v in sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][1])):
    if who != "retort":
        continue
    ours = statistics.median(v)
    peer = runs.get(("transformers", mode, shape))
    theirs = statistics.median(peer) if peer else float("nan")
    name = "KD step" if mode == "kd" else "student CE-only step"
    print(f"| {name} | {shape.replace('x', ' x ')} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.2f}x |")
PY
