#!/usr/bin/env bash
# The Shakespeare KD step (examples/configs/shakespeare_char.toml: 4-layer/128 teacher, 2-layer/64
# student, KL + CE) with one process on 2 threads against 2 ranks of 1 thread each under mpirun,
# alternating, on this machine. Prints the median student tokens/s of each and the share of the
# 2-rank phase spent in collectives (retort's own log line).
#
#   cargo build --release --features mpi
#   scripts/bench_data_parallel.sh [ROUNDS=3] [STEPS=100] [BATCH=16]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}" steps="${2:-100}" batch="${3:-16}"
bin=target/release/retort
[[ -x $bin ]] || { echo "build first: cargo build --release --features mpi" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sets=(--set teacher.pretrain.steps=20 --set "train.steps=$steps" --set "train.batch_size=$batch"
  --set eval.baseline=false --set train.eval_every=0 --set train.checkpoint_every=0
  --set eval.batches=2 --quiet)
cfg=examples/configs/shakespeare_char.toml
tps() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]+'/report.json'))['student']['train']['tokens_per_s'])" "$1"; }
one=() two=() share=()
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=2 "$bin" run "$cfg" --out "$out/one$r" "${sets[@]}" >/dev/null 2>&1
  one+=("$(tps "$out/one$r")")
  mpirun --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 "$bin" run "$cfg" --out "$out/two$r" "${sets[@]}" \
    >/dev/null 2>"$out/two$r.log"
  two+=("$(tps "$out/two$r")")
  share+=("$(grep -o 'student: 2 ranks, [0-9.]*%' "$out/two$r.log" | grep -o '[0-9.]*%' || echo '?')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m1=$(median "${one[@]}") m2=$(median "${two[@]}")
echo "batch $batch x 64, $steps student steps, $rounds rounds"
echo "1 rank  x 2 threads: ${one[*]} tokens/s (median $m1)"
echo "2 ranks x 1 thread : ${two[*]} tokens/s (median $m2)"
echo "ratio 2 ranks / 1 rank: $(python3 -c "print(f'{$m2/$m1:.2f}x')")"
echo "share of the 2-rank student phase in collectives: ${share[*]}"
