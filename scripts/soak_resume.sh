#!/usr/bin/env bash
# Soak check of resume: one run killed with SIGKILL KILLS times at random moments and resumed
# each time must end with the same weights (byte for byte) and metrics (timing fields aside)
# as an uninterrupted run. The run has two stages, EMA and early stopping (with patience enough
# to run to the end), so their state crosses the kills too. Usage: scripts/soak_resume.sh [KILLS] [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-20}"
work="${2:-runs/soak}"
cargo build --release -q
bin="$PWD/target/release/retort"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
cat > soak.toml <<'TOML'
[run]
name = "soak"
seed = 5
[data]
kind = "synthetic"
vocab = 64
train_tokens = 100000
val_tokens = 10000
[teacher]
kind = "transformer"
n_layer = 2
n_embd = 64
n_head = 4
context = 32
activation = "relu"
[teacher.pretrain]
steps = 1500
[student]
kind = "transformer"
n_layer = 1
n_embd = 32
n_head = 4
context = 32
activation = "relu"
[[loss]]
kind = "kl"
weight = 0.5
temperature = 2.0
[[loss]]
kind = "hidden_mse"
weight = 0.1
[[loss]]
kind = "ce"
weight = 0.5
[router]
kind = "magnitude"
[train]
steps = 1500
batch_size = 16
seq_len = 32
log_every = 5
eval_every = 100
checkpoint_every = 10
ema_decay = 0.98
[train.early_stopping]
metric = "val_loss"
patience = 100
[[stages]]
name = "frozen_blocks"
steps = 300
param_groups = [{ pattern = 'transformer\.h\..*', lr_mult = 0.0 }]
[[stages]]
name = "all"
steps = 1200
lr = 2e-3
[eval]
batches = 4
TOML
start=$(date +%s)
"$bin" run soak.toml --out whole --quiet > /dev/null 2>&1
t_whole=$(( $(date +%s) - start ))
start=$(date +%s)
"$bin" run soak.toml --out cut --quiet > /dev/null 2>&1 & pid=$!
done_kills=0
while [ "$done_kills" -lt "$kills" ]; do
  sleep "$(python3 -c 'import random; print(round(random.uniform(0.2, 1.5), 2))')"
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    done_kills=$((done_kills + 1))
    "$bin" run --resume cut --quiet > /dev/null 2>&1 & pid=$!
  else
    wait "$pid" || { echo "a resumed run failed" >&2; exit 1; }
    echo "the run finished after $done_kills kills (before $kills)" >&2
    break
  fi
done
wait "$pid"
t_cut=$(( $(date +%s) - start ))
for phase in teacher student baseline; do
  cmp "whole/$phase/model.safetensors" "cut/$phase/model.safetensors"
done
python3 - <<'PY'
import json
def load(p):
    out = []
    for line in open(p):
        m = json.loads(line)
        if m.get("event") == "report":
            continue
        m.pop("elapsed_s", None); m.pop("tokens_per_s", None)
        out.append(m)
    return out
a, b = load("whole/metrics.jsonl"), load("cut/metrics.jsonl")
assert a == b, "metrics differ"
print(f"metrics identical: {len(a)} records")
PY
echo "OK: $kills SIGKILLs, weights identical; uninterrupted ${t_whole}s, killed-and-resumed ${t_cut}s"
