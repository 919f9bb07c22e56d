#!/usr/bin/env bash
# The CUDA build on a machine without a GPU (CI runs it from .ci/run): installs the pinned CUDA
# 13.0 compiler and the driver stand-ins (scripts/cuda_toolchain.sh), builds the workspace with
# `--features cuda`, runs its test suite on the CPU (the GPU checks skip: no device opens), and
# checks every PTX module of the build (retort's and candle's) with `ptxas` for sm_80 and sm_90.
#
#   scripts/ci_cuda.sh            # what CI runs
#   scripts/ci_cuda.sh --no-test  # build and ptxas only
set -euo pipefail
cd "$(dirname "$0")/.."
run_tests=1
[[ "${1:-}" == "--no-test" ]] && run_tests=0

eval "$(scripts/cuda_toolchain.sh)"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
features=(--features retort-host/cuda,retort-host/nccl,retort-plugins/cuda)
# The dynamic-plugin tests build plugin crates with cargo inside the test; in this build that
# would compile candle's CUDA crates twice more (another feature set, the scaffold's own
# profile: ~20 minutes on 2 cores). They run in the CPU build (.ci/run's first command); the
# CUDA build's plugins get `cuda` in their fingerprint the same way (core/build.rs).
filter=(-E 'not binary_id(retort-host::plugins)')

start=$(date +%s)
if ((run_tests)); then
  cargo nextest run --workspace "${features[@]}" --no-fail-fast "${filter[@]}"
else
  cargo build --workspace --all-targets "${features[@]}"
fi
echo "ci_cuda: cuda build and tests took $(($(date +%s) - start)) s"

# Every PTX module this build compiled (candle-kernels' and retort-plugins'), newest of each name.
build_dir="${CARGO_TARGET_DIR:-target}/debug/build"
mapfile -t ptx < <(find "$build_dir" -path '*/out/*.ptx' -printf '%T@ %p\n' 2>/dev/null |
  sort -rn | awk '{print $2}' | awk -F/ '!seen[$NF]++')
((${#ptx[@]} > 0)) || { echo "ci_cuda: no PTX found under $build_dir" >&2; exit 1; }
failed=0
for file in "${ptx[@]}"; do
  for arch in sm_80 sm_90; do
    if ! ptxas -arch="$arch" -o /dev/null "$file" 2>/tmp/ptxas.err; then
      echo "ci_cuda: ptxas -arch=$arch failed on $file:" >&2
      cat /tmp/ptxas.err >&2
      failed=1
    fi
  done
done
((failed == 0)) || exit 1
echo "ci_cuda: ptxas accepted ${#ptx[@]} PTX modules for sm_80 and sm_90"
