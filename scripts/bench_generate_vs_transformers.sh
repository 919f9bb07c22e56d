#!/usr/bin/env bash
# Batched sampling throughput, retort against Hugging Face transformers on the same machine,
# back to back: SmolLM2-135M-Instruct, BATCH continuations of one prompt, NEW tokens each
# (end of sequence ignored on both sides, temperature 1, no top-k/top-p), KV cache on both.
#
# Usage: scripts/bench_generate_vs_transformers.sh [ROUNDS] [BATCH] [NEW]   (defaults 3 16 128)
#   MODEL=path.gguf   the checkpoint (default models/SmolLM2-135M-Instruct.Q4_1.gguf;
#                     scripts/fetch_smollm2.sh fetches it)
#   PYTHON=/path/to/python   an interpreter with torch, transformers, gguf and accelerate (see
#                     docs/performance.md, "Installing PyTorch"); without it retort runs alone
# retort runs twice per round: with the Q4_1 weights as stored, and dequantized to f32 (the
# weights transformers loads from the same file). Each prints tokens/s without model loading.
# The script prints the medians and transformers / retort time ratios (> 1: retort is faster).
# CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
batch="${2:-16}"
new="${3:-128}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
py="${PYTHON:-python3}"
prompt="Once upon a time"
[ -f "$model" ] || { echo "no $model: run scripts/fetch_smollm2.sh" >&2; exit 2; }
cargo build --release -q -p retort-host
retort=target/release/retort

rate() { sed -n 's/.*(\([0-9.]*\) tokens\/s).*/\1/p'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

q=(); f=()
for r in $(seq "$rounds"); do
    x=$("$retort" generate --model "$model" --prompt "$prompt" --batch "$batch" --max-tokens "$new" \
        --temperature 1 --ignore-eos --seed "$r" 2>&1 >/dev/null | rate)
    y=$("$retort" generate --model "$model" --prompt "$prompt" --batch "$batch" --max-tokens "$new" \
        --temperature 1 --ignore-eos --seed "$r" --dequantize 2>&1 >/dev/null | rate)
    echo "retort round $r: Q4_1 $x tokens/s, dequantized $y tokens/s"
    q+=("$x"); f+=("$y")
done
qm=$(printf '%s\n' "${q[@]}" | median)
fm=$(printf '%s\n' "${f[@]}" | median)
echo "retort median: Q4_1 $qm tokens/s, dequantized $fm tokens/s (batch $batch x $new new tokens)"
if "$py" -c "import torch, transformers, gguf, accelerate" 2>/dev/null; then
    out=$("$py" scripts/transformers_generate.py --gguf "$model" --prompt "$prompt" --batch "$batch" \
        --new "$new" --rounds "$rounds")
    echo "$out"
    tm=$(echo "$out" | sed -n 's/^transformers median: \([0-9.]*\).*/\1/p')
    awk -v q="$qm" -v f="$fm" -v t="$tm" 'BEGIN {
        printf "retort / transformers throughput: Q4_1 %.2fx, dequantized %.2fx\n", q / t, f / t }'
else
    echo "no torch/transformers/gguf for $py: retort alone (see docs/performance.md)"
fi
