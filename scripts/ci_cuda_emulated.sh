#!/usr/bin/env bash
# The CUDA kernels' device code run on the CPU (CI runs it from .ci/run): every `.cu` file of
# plugins/src/kernels compiled as C++ against kernels/cuda/emulate.h (feature `cuda-emulate` of
# retort-plugins) and each kernel compared with its op's CPU implementation. Needs no GPU and no
# CUDA toolkit, only a C++20 compiler (installs Debian's g++ when absent).
#
#   scripts/ci_cuda_emulated.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v g++ >/dev/null 2>&1; then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq g++
fi
start=$(date +%s)
cargo nextest run -p retort-plugins --features cuda-emulate --lib --no-fail-fast \
  -E 'test(/cuda_emulated|kernels::emulated|kernels::grid|attention::plan/)'
echo "ci_cuda_emulated: the emulated CUDA kernels' tests took $(($(date +%s) - start)) s"
