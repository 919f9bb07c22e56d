#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root after scripts/gpu_pack.sh made
# gpu/ here (the machine needs no Rust toolchain and no network; Python with PyTorch and
# transformers, and NVIDIA's CUDA 13 libraries as Python packages or system libraries).
# About 10 minutes on an H100/H200 (--quick: the selftest alone):
#   1. where the binary's libraries come from (`ldd`), the GPU (`nvidia-smi`);
#   2. `retort selftest --device cuda`: every fused op against its composite; then the
#      attention cases again as JSON: the fused attention's TFLOP/s at [2, 16, 2048, 64], bf16
#      and f16 on tensor cores and again on the FMA kernels (RETORT_TENSOR_CORES=0);
#   3. the quickstart on cuda and on the CPU, side by side: val losses must agree within 1e-3;
#      then the quickstart on cuda killed (SIGKILL) after a student checkpoint and resumed: its
#      exports compared byte for byte with the uninterrupted cuda run's; a logit cache built
#      with its teacher on cuda (`retort cache`, then `cache inspect`); then the NCCL backend
#      smoke-tested as a world of one rank on the quickstart (its val losses against the plain
#      cuda run's);
#   4. a llama of SmolLM2-135M's shapes (random weights, SmolLM2's tokenizer): `retort generate`
#      with the KV cache on cuda and on the CPU; the KD step (teacher 30 blocks, 4-block
#      student, batch 8 x 256, f32) with retort on cuda; the same KD step in bf16 at 8 x 512
#      (student.dtype = "bf16": bf16 compute, f32 master weights; teacher.precision = "bf16");
#      then transformers + PyTorch eager on the same GPU: f32 at 8 x 256, bf16 at 8 x 256 and
#      8 x 512, and autocast (f32 master weights, as retort) at 8 x 512: tokens/s, peak memory,
#      and the ratios;
#   5. the loss region fused with the LM head and not (`lm_head_memory`, bf16, 0.7 kl + 0.3 ce)
#      at N = 8192, H = 4096, V = 128256 and at N = 1024: time, and the device's peak memory
#      (nvidia-smi) over what it held before.
# Writes everything to $OUT (default /tmp/retort-gpu): gpu_run.log, selftest.txt, summary.json.
#
#   scripts/gpu_run.sh [--quick]      # --quick: selftest only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/retort-gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_run.log") 2>&1
PY="${PYTHON:-python3}"
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
say() { printf '\n== %s (%s s)\n' "$*" "$SECONDS"; }

say "binary"
bin=/tmp/retort-bin/retort
mkdir -p /tmp/retort-bin
[[ -f gpu/retort.xz ]] || { echo "gpu/retort.xz missing: run scripts/gpu_pack.sh first"; exit 2; }
if command -v xz >/dev/null; then
  xz -dc gpu/retort.xz >"$bin"
else
  "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' gpu/retort.xz "$bin"
fi
chmod +x "$bin"
echo "commit $(cat gpu/COMMIT 2>/dev/null)"

# NVIDIA's libraries: the Python packages' (site-packages/nvidia/*/lib), then the system's.
libs=$("$PY" - <<'PYEOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13", "libnccl.so.2"]
dirs = []
for r in roots:
    for w in want:
        for f in glob.glob(os.path.join(r, "nvidia", "**", w), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PYEOF
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|nccl|not found'
if ldd "$bin" | grep -q 'stubs'; then echo "the driver stand-ins are on the library path: stop"; exit 1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

say "selftest --device cuda"
timeout 240 "$bin" selftest --device cuda | tee "$OUT/selftest.txt"
selftest_rc=${PIPESTATUS[0]}
echo "selftest exit code $selftest_rc"
((quick)) && exit "$selftest_rc"

say "attention forward + backward, machine-readable (T = 2048, d = 64: TFLOP/s in the summary)"
timeout 120 "$bin" selftest --device cuda --filter attention --json >"$OUT/attention.json"
echo "attention selftest exit $?"
say "the same with bf16/f16 on the FMA kernels (RETORT_TENSOR_CORES=0): the tensor cores' gain side by side"
RETORT_TENSOR_CORES=0 timeout 120 "$bin" selftest --device cuda --filter attention --json >"$OUT/attention_fma.json"
echo "attention selftest (FMA) exit $?"

say "quickstart on cuda and on the CPU (side by side)"
rm -rf /tmp/qs-cuda /tmp/qs-cpu
(timeout 200 "$bin" run --quiet --out /tmp/qs-cpu >"$OUT/quickstart_cpu.txt" 2>&1; echo "cpu exit $?" >>"$OUT/quickstart_cpu.txt") &
cpu_pid=$!
timeout 200 "$bin" run --quiet --out /tmp/qs-cuda --set run.device=cuda 2>&1 | tee "$OUT/quickstart_cuda.txt"
echo "cuda exit ${PIPESTATUS[0]}"
wait "$cpu_pid"
cat "$OUT/quickstart_cpu.txt"

say "kill and resume on cuda: the quickstart killed (SIGKILL) after a student checkpoint, resumed, exports compared byte for byte with the uninterrupted cuda run"
rm -rf /tmp/qs-kill
timeout 200 "$bin" run --quiet --out /tmp/qs-kill --set run.device=cuda >/dev/null 2>&1 &
kill_pid=$!
for _ in $(seq 1 1800); do
  compgen -G "/tmp/qs-kill/checkpoints/student/step-*" >/dev/null && break
  sleep 0.1
done
kill -9 "$kill_pid" 2>/dev/null; wait "$kill_pid" 2>/dev/null
echo "killed with checkpoints: $(ls /tmp/qs-kill/checkpoints/student 2>/dev/null | tr '\n' ' ')"
timeout 200 "$bin" run --resume /tmp/qs-kill --quiet 2>&1 | tail -5
echo "resume exit ${PIPESTATUS[0]}"
for phase in teacher student baseline; do
  if cmp "/tmp/qs-cuda/$phase/model.safetensors" "/tmp/qs-kill/$phase/model.safetensors"; then
    echo "kill-resume $phase: identical" | tee -a "$OUT/kill_resume.txt"
  else
    echo "kill-resume $phase: DIFFERENT" | tee -a "$OUT/kill_resume.txt"
  fi
done

say "logit cache built with the quickstart's teacher on cuda (top-16), then inspected"
rm -rf /tmp/qs-cache
timeout 120 "$bin" cache --set run.device=cuda --set teacher.checkpoint=/tmp/qs-cuda/teacher \
  --out /tmp/qs-cache --k 16 2>&1 | tail -3
echo "cache exit ${PIPESTATUS[0]}"
timeout 60 "$bin" cache inspect /tmp/qs-cache 2>&1 | head -12 | tee "$OUT/cache_inspect.txt"

say "NCCL smoke test: the quickstart on cuda as a world of one NCCL rank (parameter check every step)"
rm -rf /tmp/qs-nccl
WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 \
  timeout 200 "$bin" run --quiet --out /tmp/qs-nccl --set run.device=cuda \
  --set 'parallel.backend="nccl"' --set parallel.check_every=1 2>&1 | tee "$OUT/quickstart_nccl.txt"
echo "nccl exit ${PIPESTATUS[0]}"

say "SmolLM2-shaped teacher (random weights) for both sides"
rm -rf /tmp/retort-smollm2
timeout 120 "$PY" scripts/gpu/torch_kd_smollm2.py --save-teacher /tmp/retort-smollm2 &&
  cp gpu/smollm2/tokenizer.json /tmp/retort-smollm2/

say "generate with the KV cache on cuda and on the CPU (the SmolLM2-shaped llama, greedy, 32 tokens)"
for d in cuda cpu; do
  timeout 90 "$bin" generate --model /tmp/retort-smollm2 --prompt "ROMEO:" --max-tokens 32 --ignore-eos \
    --device "$d" 2>&1 | tee "$OUT/generate_$d.txt"
done

say "retort KD step on cuda (batch 8 x 256, f32)"
rm -rf /tmp/kd-cuda
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >/tmp/retort-mem.txt &
mem_pid=$!
timeout 240 "$bin" run scripts/gpu/smollm2_kd.toml --quiet --out /tmp/kd-cuda \
  --set data.path=gpu/tinyshakespeare.txt --set data.tokenizer.path=gpu/smollm2/tokenizer.json \
  --set teacher.checkpoint=/tmp/retort-smollm2 2>&1 | tail -40
echo "retort exit ${PIPESTATUS[0]}"
kill "$mem_pid" 2>/dev/null
echo "retort peak GPU memory used (MiB, whole device): $(sort -n /tmp/retort-mem.txt | tail -1)"

say "retort KD step on cuda in bf16 (mixed precision student, bf16 teacher; batch 8 x 512)"
rm -rf /tmp/kd-cuda-bf16
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >/tmp/retort-mem-bf16.txt &
mem_pid=$!
timeout 240 "$bin" run scripts/gpu/smollm2_kd.toml --quiet --out /tmp/kd-cuda-bf16 \
  --set data.path=gpu/tinyshakespeare.txt --set data.tokenizer.path=gpu/smollm2/tokenizer.json \
  --set teacher.checkpoint=/tmp/retort-smollm2 --set 'student.dtype="bf16"' --set 'teacher.precision="bf16"' \
  --set train.seq_len=512 --set run.name=smollm2_kd_cuda_bf16 2>&1 | tail -40
echo "retort bf16 exit ${PIPESTATUS[0]}"
kill "$mem_pid" 2>/dev/null
echo "retort bf16 peak GPU memory used (MiB, whole device): $(sort -n /tmp/retort-mem-bf16.txt | tail -1)"

say "transformers + PyTorch eager, same shapes, same GPU"
timeout 150 "$PY" scripts/gpu/torch_kd_smollm2.py --teacher /tmp/retort-smollm2 --steps 20 --dtype f32 | tee "$OUT/torch_f32.json"
timeout 100 "$PY" scripts/gpu/torch_kd_smollm2.py --teacher /tmp/retort-smollm2 --steps 20 --dtype bf16 | tee "$OUT/torch_bf16.json"
timeout 120 "$PY" scripts/gpu/torch_kd_smollm2.py --teacher /tmp/retort-smollm2 --steps 20 --dtype bf16 --seq 512 | tee "$OUT/torch_bf16_512.json"
timeout 120 "$PY" scripts/gpu/torch_kd_smollm2.py --teacher /tmp/retort-smollm2 --steps 20 --dtype amp --seq 512 | tee "$OUT/torch_amp_512.json"

say "fused LM-head loss on cuda, bf16 (N x H x V)"
lmh=/tmp/retort-bin/lm_head_memory
if [[ -f gpu/lm_head_memory.xz ]]; then
  "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' gpu/lm_head_memory.xz "$lmh"
  chmod +x "$lmh"
  for shape in "8192 4096 128256" "1024 4096 128256"; do
    for mode in --fused --unfused; do
      before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >/tmp/lmh-mem.txt &
      mem_pid=$!
      # shellcheck disable=SC2086
      timeout 120 "$lmh" $shape $mode --device cuda --dtype bf16 --reps 5 2>&1 | tee -a "$OUT/lm_head.txt"
      kill "$mem_pid" 2>/dev/null
      echo "  device memory: $before MiB before, peak $(sort -n /tmp/lmh-mem.txt | tail -1) MiB" | tee -a "$OUT/lm_head.txt"
    done
  done
else
  echo "gpu/lm_head_memory.xz missing (an older pack): skipped"
fi

say "summary"
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        return {"error": str(e)}
def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x
summary = {}
try:
    summary["kill_resume"] = open(f"{out}/kill_resume.txt").read().split("\n")[:3]
except Exception as e:
    summary["kill_resume"] = {"error": str(e)}
qs = {d: dict(leaves(load(f"/tmp/qs-{d}/report.json"))) for d in ("cuda", "cpu")}
try:
    nccl = dict(leaves(load("/tmp/qs-nccl/report.json")))
    summary["quickstart_nccl_vs_cuda_max_val_loss_diff"] = max(
        abs(nccl[k] - v) for k, v in qs["cuda"].items()
        if "val" in k and "loss" in k and isinstance(v, (int, float)) and not isinstance(v, bool))
except Exception as e:
    summary["quickstart_nccl"] = {"error": str(e)}
vals = {k: (qs["cuda"].get(k), v) for k, v in qs["cpu"].items()
        if "val" in k and "loss" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
summary["quickstart_val_loss_cuda_vs_cpu"] = vals
diffs = [abs(a - b) for a, b in vals.values() if isinstance(a, (int, float))]
summary["quickstart_max_val_loss_diff"] = max(diffs) if diffs else None
kd = dict(leaves(load("/tmp/kd-cuda/report.json")))
tps = {k: v for k, v in kd.items() if k.endswith("tokens_per_s")}
summary["retort_kd_tokens_per_s"] = tps
for dt in ("f32", "bf16"):
    try:
        summary[f"torch_{dt}"] = json.loads(open(f"{out}/torch_{dt}.json").read().strip().splitlines()[-1])
    except Exception as e:
        summary[f"torch_{dt}"] = {"error": str(e)}
r = [v for v in tps.values() if isinstance(v, (int, float))]
t = summary["torch_f32"].get("tokens_per_s")
if r and t:
    summary["retort_over_torch_f32"] = round(max(r) / t, 3)
kd16 = dict(leaves(load("/tmp/kd-cuda-bf16/report.json")))
tps16 = [v for k, v in kd16.items() if k.endswith("tokens_per_s") and isinstance(v, (int, float))]
summary["retort_kd_bf16_512_tokens_per_s"] = max(tps16) if tps16 else None
for peer in ("bf16_512", "amp_512"):
    try:
        summary[f"torch_{peer}"] = json.loads(open(f"{out}/torch_{peer}.json").read().strip().splitlines()[-1])
        if tps16:
            summary[f"retort_bf16_over_torch_{peer}"] = round(max(tps16) / summary[f"torch_{peer}"]["tokens_per_s"], 3)
    except Exception as e:
        summary[f"torch_{peer}"] = {"error": str(e)}
# Causal attention FLOPs: forward 2 B H T^2 d (QK^T and PV over half the square), backward 2.5x.
for file, tail in (("attention.json", ""), ("attention_fma.json", "_fma")):
    try:
        for c in json.load(open(f"{out}/{file}"))["cases"]:
            timing = c.get("timing") or {}
            if c.get("shape") == [2, 16, 2048, 64] and timing.get("fused_ms"):
                b, h, t_, d = c["shape"]
                flops = 3.5 * 2 * b * h * t_ * t_ * d
                key = f"attention_{c.get('variant', '')}_{c.get('dtype')}{tail}_tflops".replace(" ", "_").replace(",", "")
                summary[key] = round(flops / (timing["fused_ms"] * 1e-3) / 1e12, 1)
    except Exception as e:
        summary[f"attention{tail}_tflops"] = {"error": str(e)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PYEOF
say "done"
