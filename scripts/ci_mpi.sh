#!/usr/bin/env bash
# The data-parallel build (CI runs it from .ci/run): installs Open MPI and what the `mpi`
# crate's bindings need (libclang) from Debian's packages when absent, builds retort-host with
# `--features mpi` and runs its multi-process tests (host/tests/data_parallel.rs) with
# `mpirun --oversubscribe` on loopback.
#
#   scripts/ci_mpi.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1 ||
  ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev libclang-dev clang pkg-config >/dev/null
fi
mpirun --version | head -1

start=$(date +%s)
cargo nextest run -p retort-host --features mpi --no-fail-fast -E 'binary_id(retort-host::data_parallel)'
echo "ci_mpi: mpi build and tests took $(($(date +%s) - start)) s"
