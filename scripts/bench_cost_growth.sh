#!/usr/bin/env bash
# How the SmolLM2 training steps' cost grows with the sequence length, the student's width and
# its vocabulary (issue #21), through the real `retort run` path on this machine.
#
# Base: examples/configs/smollm2_distill.toml (teacher: the SmolLM2-135M Q4_1 GGUF, 30 blocks;
# 0.7 kl(T=2) + 0.3 ce; AdamW). The `student` phase's steps are KD steps (teacher forward +
# student forward/backward + update), the `baseline` phase's CE-only steps (the same student on
# hard labels). A step's time is the median difference of consecutive train records'
# `elapsed_s` (log_every = 1, no evaluation during training), the first step left out.
#
#   sequence: 2,048 tokens per step as 32x64, 16x128, 8x256, 4x512, 2x1024 (the teacher's
#             blocks 0/10/19/29 as the student, as in the example);
#   width:    a 4-block student from scratch of width 288, 576, 1152 (heads of 64, grouped
#             keys/values 3:1, SwiGLU 8/3 wide, tied embeddings) at 4 x 256;
#   vocab:    the 576-wide student from scratch with its vocabulary padded to 49,152 (the
#             tokenizer's), 98,304 and 196,608 rows at 4 x 256: the pipeline narrows a padded
#             head to the tokenizer's rows, so this is the cost of carrying the padded rows
#             (embedding gradient, AdamW), not of a larger softmax (docs/performance.md).
#
# Usage: scripts/bench_cost_growth.sh [STEPS=4] [SWEEPS="sequence width vocab"]
# Needs models/ (scripts/fetch_smollm2.sh) and ../shared/data/tinyshakespeare.txt. Not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-4}"
sweeps="${2:-sequence width vocab}"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "no $model: run scripts/fetch_smollm2.sh" >&2; exit 2; }
cargo build --release -q -p retort-host
bin=target/release/retort
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

step_ms() { python3 scripts/step_ms.py "$1" "$2"; }

# run NAME BATCH SEQ [--set ...]: prints "KD_ms CE_ms"
run() {
    local name=$1 b=$2 s=$3
    shift 3
    "$bin" run "$out/config.toml" --out "$out/$name" --quiet \
        --set train.batch_size="$b" --set train.seq_len="$s" --set train.steps="$((steps + 1))" \
        --set train.log_every=1 --set train.eval_every=0 --set eval.batches=1 --set eval.batch_size=1 \
        "$@" >"$out/$name.log" 2>&1 || { echo "retort failed: see below" >&2; cat "$out/$name.log" >&2; exit 1; }
    echo "$(step_ms "$out/$name/metrics.jsonl" student) $(step_ms "$out/$name/metrics.jsonl" baseline)"
}

tokens_per_s() { python3 -c "import sys; print(f'{$1 * 1000 / float(sys.argv[1]):.0f}' if sys.argv[1] != 'nan' else 'nan')" "$2"; }

# The example with contexts for 1,024 positions.
sed -e 's/^context = 256 .*$/context = 1024/' -e 's/^context = 256$/context = 1024/' \
    examples/configs/smollm2_distill.toml >"$out/config.toml"

if [[ " $sweeps " == *" sequence "* ]]; then
    echo "| batch x seq | KD ms/step | KD tokens/s | CE ms/step | CE tokens/s |"
    echo "|---|---:|---:|---:|---:|"
    for shape in 32x64 16x128 8x256 4x512 2x1024; do
        b=${shape%x*} s=${shape#*x}
        read -r kd ce < <(run "seq-$shape" "$b" "$s")
        echo "| $shape | $kd | $(tokens_per_s $((b * s)) "$kd") | $ce | $(tokens_per_s $((b * s)) "$ce") |"
    done
    echo
fi

# A from-scratch student of width $1 (and vocabulary $2 rows, default the tokenizer's).
scratch_student() {
    local w=$1 heads=$(($1 / 64))
    local kv=$((heads / 3 > 0 ? heads / 3 : 1))
    local inter=$(((w * 8 / 3 + 63) / 64 * 64))
    python3 - "$out/config.toml" "$w" "$heads" "$kv" "$inter" "${2:-}" <<'PY'
import re, sys
path, w, h, kv, inter, vocab = sys.argv[1:]
text = open(path).read()
student = (f'[student]\nkind = "llama"\nn_layer = 4\nn_embd = {w}\nn_head = {h}\nn_kv_head = {kv}\n'
           f'intermediate = {inter}\ncontext = 1024\ntie_embeddings = true\n'
           + (f'vocab_size = {vocab}\n' if vocab else '') + '\n')
text = re.sub(r'\[student\].*?(?=\[\[loss\]\])', student, text, flags=re.S)
open(path + f'.w{w}v{vocab or "tok"}.toml', 'w').write(text)
print(path + f'.w{w}v{vocab or "tok"}.toml')
PY
}

# sweep KIND TOKENS ARG...: a from-scratch student per ARG ("WIDTH" or "WIDTH:VOCAB") at 4 x 256.
sweep() {
    local kind=$1
    shift
    echo "| student $kind | KD ms/step | KD tokens/s | CE ms/step | CE tokens/s |"
    echo "|---|---:|---:|---:|---:|"
    cp "$out/config.toml" "$out/base.toml"
    for arg in "$@"; do
        local w=${arg%%:*} v=""
        [[ $arg == *:* ]] && v=${arg#*:}
        cp "$(scratch_student "$w" "$v")" "$out/config.toml"
        read -r kd ce < <(run "$kind-$arg" 4 256)
        echo "| ${v:-$w} | $kd | $(tokens_per_s 1024 "$kd") | $ce | $(tokens_per_s 1024 "$ce") |"
        cp "$out/base.toml" "$out/config.toml"
    done
    echo
}

[[ " $sweeps " == *" width "* ]] && sweep width 288 576 1152
[[ " $sweeps " == *" vocab "* ]] && sweep "vocabulary rows" 576:49152 576:98304 576:196608
exit 0
