#!/usr/bin/env python3
"""The transformers peer of `retort generate --batch N`: sample N continuations of one prompt
with `model.generate` (KV cache), every sample exactly NEW tokens long, and print tokens/s.

The GGUF checkpoint is dequantized to float32 by transformers at load (its GGUF support), the
same weights `retort generate --dequantize` uses. Loading is not timed; each round times one
`generate` call (prefill included), after one warm-up call.

    python3 scripts/transformers_generate.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 16 --new 128 --rounds 3
"""
import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    inputs = tok([a.prompt] * a.batch, return_tensors="pt")
    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tok.eos_token_id,
    )
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **kwargs)
        rates = []
        for r in range(a.rounds):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=a.new, min_new_tokens=a.new, **kwargs)
            dt = time.perf_counter() - t0
            new = (out.shape[1] - inputs["input_ids"].shape[1]) * a.batch
            rates.append(new / dt)
            print(f"transformers round {r + 1}: {new} tokens in {dt:.2f} s ({new / dt:.1f} tokens/s)", flush=True)
    print(f"transformers median: {statistics.median(rates):.1f} tokens/s "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
