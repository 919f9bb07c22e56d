"""Median milliseconds per step of one phase of a run: the differences of consecutive train
records' `elapsed_s` in its metrics.jsonl (the phase's first step left out, as it has no
predecessor). Used by the bench scripts.

    python3 scripts/step_ms.py RUN_DIR/metrics.jsonl PHASE
"""
import json
import statistics
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
elapsed = [r["elapsed_s"] for r in records if r.get("event") == "train" and r.get("phase") == sys.argv[2]]
steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
print(f"{statistics.median(steps) * 1e3:.1f}" if steps else "nan")
