#!/usr/bin/env python3
"""Bytes/token of the seed design for a teacher logit cache: top-k values as fp32 and ids as
int64 in HDF5 with gzip (h5py defaults: gzip level 4, shuffle off, chunks of one window of
`seq_len` tokens), measured on the same teacher outputs a retort cache holds.

Usage:
  retort cache export CACHE --out DIR --split train      # from an f32 cache (exact values)
  python3 scripts/seed_cache_size.py DIR [--k 16 64 128] [--seq-len 128]

Needs numpy and h5py (`pip install numpy h5py`); never run in CI.
"""
import argparse, json, os, sys, tempfile

try:
    import h5py
    import numpy as np
except ImportError as e:  # pragma: no cover
    sys.exit(f"needs numpy and h5py: {e}")

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 128])
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--gzip", type=int, default=4)
a = ap.parse_args()
meta = json.load(open(os.path.join(a.dir, "meta.json")))
K, N = meta["k"], meta["tokens"]
if meta["values"] != "f32":
    print(f"note: the export holds {meta['values']} values, not exact f32 ones; gzip will find them more regular than real fp32 logits", file=sys.stderr)
ids = np.fromfile(os.path.join(a.dir, "ids.u32"), dtype="<u4").reshape(N, K)
lps = np.fromfile(os.path.join(a.dir, "logprobs.f32"), dtype="<f4").reshape(N, K)
print(f"{N} tokens, top-{K} of vocab {meta['vocab']} from {meta['source']}")
print("| k | seed design raw (fp32 + int64) | seed design HDF5 gzip-%d | bytes/token |" % a.gzip)
print("|---:|---:|---:|---:|")
for k in a.k:
    if k > K:
        continue
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seed.h5")
        with h5py.File(path, "w") as f:
            chunk = (min(a.seq_len, N), k)
            f.create_dataset("values", data=lps[:, :k].astype(np.float32), compression="gzip", compression_opts=a.gzip, chunks=chunk)
            f.create_dataset("indices", data=ids[:, :k].astype(np.int64), compression="gzip", compression_opts=a.gzip, chunks=chunk)
        size = os.path.getsize(path)
    print(f"| {k} | {k * 12} | {size} | {size / N:.1f} |")
