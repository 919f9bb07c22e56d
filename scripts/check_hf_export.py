#!/usr/bin/env python3
"""Loads a retort run's exported student with Hugging Face `transformers`, unchanged, and
recomputes the report's validation loss on the same windows.

Usage: python scripts/check_hf_export.py RUN_DIR
For runs on a `text` source with the `char` tokenizer (ids = sorted distinct characters), the
windows are those of retort's evaluation: the last `val_fraction` of the tokens, consecutive
windows of `train.seq_len`, `eval.batches * eval.batch_size` of them. Needs torch and
transformers (never in CI; see docs/performance.md for installing torch here).
"""
import json
import sys
import tomllib

import torch
import transformers
from transformers import AutoModelForCausalLM

run = sys.argv[1]
cfg = tomllib.load(open(f"{run}/config.resolved.toml", "rb"))
assert cfg["data"]["kind"] == "text" and cfg["data"]["tokenizer"]["kind"] == "char", "char-level text runs only"
text = open(cfg["data"]["path"], encoding="utf-8").read()
chars = sorted(set(text))
index = {c: i for i, c in enumerate(chars)}
ids = [index[c] for c in text]
n_val = round(len(ids) * cfg["data"].get("val_fraction", 0.1))
val = ids[len(ids) - n_val:]
seq = cfg["train"]["seq_len"]
n_windows = min((len(val) - 1) // seq, cfg["eval"]["batches"] * cfg["eval"]["batch_size"])
model = AutoModelForCausalLM.from_pretrained(f"{run}/student", dtype=torch.float32).eval()
total = 0.0
with torch.no_grad():
    for w in range(n_windows):
        x = torch.tensor([val[w * seq:(w + 1) * seq]])
        y = torch.tensor(val[w * seq + 1:(w + 1) * seq + 1])
        logits = model(x).logits[0].double()
        total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
hf = total / (n_windows * seq)
ours = json.load(open(f"{run}/report.json"))["student"]["val_loss"]
print(f"{type(model).__name__} via transformers {transformers.__version__}: val loss {hf:.8f}; "
      f"retort's report {ours:.8f}; |difference| {abs(hf - ours):.2e}")
sys.exit(0 if abs(hf - ours) < 1e-4 else 1)
