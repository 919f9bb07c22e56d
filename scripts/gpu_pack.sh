#!/usr/bin/env bash
# Builds what scripts/gpu_run.sh needs on a GPU machine (which has no Rust toolchain and no
# network) into gpu/ (git-ignored, at most 64 MiB): the stripped, xz-compressed release binary
# of the cuda build and of the fused LM-head example (`lm_head_memory`), SmolLM2's tokenizer (from the GGUF's metadata) and the Tiny Shakespeare
# text. Send gpu/ with the working tree (the device tool: carry = ["gpu"]).
#
#   scripts/gpu_pack.sh          # needs models/SmolLM2-135M-Instruct.Q4_1.gguf (fetch_smollm2.sh)
#
# CUDA_COMPUTE_CAP (default 80) is the target of candle's kernels; retort's own are compute_80.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda_toolchain.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
gguf="${RETORT_SMOLLM2_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
text="${RETORT_TEXT:-../shared/data/tinyshakespeare.txt}"
[[ -f "$gguf" ]] || { echo "gpu_pack: $gguf missing: run scripts/fetch_smollm2.sh" >&2; exit 2; }
[[ -f "$text" ]] || { echo "gpu_pack: $text missing" >&2; exit 2; }

cargo build --release --features cuda,nccl -p retort-host
cargo build --release --features cuda -p retort-plugins --example lm_head_memory
cargo run --release -q -p retort-plugins --example gguf_tokenizer -- "$gguf" /tmp/retort-tokenizer.json

rm -rf gpu && mkdir -p gpu/smollm2
strip -o gpu/retort "$CARGO_TARGET_DIR/release/retort"
xz -6 -T2 gpu/retort
strip -o gpu/lm_head_memory "$CARGO_TARGET_DIR/release/examples/lm_head_memory"
xz -6 -T2 gpu/lm_head_memory
mv /tmp/retort-tokenizer.json gpu/smollm2/tokenizer.json
cp "$text" gpu/tinyshakespeare.txt
git rev-parse HEAD >gpu/COMMIT
size=$(du -sb gpu | cut -f1)
echo "gpu_pack: gpu/ holds $((size / 1024 / 1024)) MiB:"
ls -la gpu gpu/smollm2
((size <= 64 * 1024 * 1024)) || { echo "gpu_pack: over 64 MiB" >&2; exit 1; }
