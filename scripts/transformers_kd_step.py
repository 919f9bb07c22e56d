#!/usr/bin/env python3
"""The transformers + PyTorch eager peer of retort's SmolLM2 KD step
(examples/configs/smollm2_distill.toml): the GGUF teacher dequantized to float32, a student of
its blocks 0, 10, 19, 29 (embedding, final norm and tied head included), random windows of the
text tokenized by the teacher's tokenizer, AdamW (lr 5e-4, betas 0.9/0.95, weight decay 0.01,
gradients clipped to norm 1).

  --mode kd: teacher forward without gradients, then
             0.7 T^2 KL(teacher || student at T = 2) + 0.3 CE on the student, backward, AdamW
  --mode ce: the student alone on hard labels (retort's `baseline` phase)

--teacher-dtype bfloat16 casts the teacher; --student-dtype bfloat16 runs the student's forward
under CPU autocast (bf16 matrix products, float32 master weights; the loss in float32).

Prints the median milliseconds per step after `--warmup` steps (the step: forward, backward,
clipping and the optimizer; drawing the batch is not timed).

    python3 scripts/transformers_kd_step.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data ../shared/data/tinyshakespeare.txt --batch 8 --seq 256 --steps 5 --mode kd
"""
import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

LAYERS = [0, 10, 19, 29]


def student_of(teacher):
    """A 4-block llama initialised from the teacher's blocks LAYERS."""
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(LAYERS)
    student = type(teacher)(cfg)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for i, j in enumerate(LAYERS):
        student.model.layers[i].load_state_dict(teacher.model.layers[j].state_dict())
    student.tie_weights()
    return student


def kd_loss(s, t, y, temperature=2.0):
    v = s.shape[-1]
    s, t = s.reshape(-1, v), t.reshape(-1, v)
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return 0.7 * temperature**2 * kl + 0.3 * F.cross_entropy(s, y.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mode", choices=["kd", "ce"], default="kd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the frozen teacher's dtype (bfloat16: retort's teacher.precision = \"bf16\"); the student stays float32",
    )
    ap.add_argument(
        "--student-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: the student's forward under torch.autocast(\"cpu\", bfloat16), float32 weights, "
        "the loss on its logits in float32 (retort's student.dtype = \"bf16\")",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    teacher = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa"
    )
    teacher.eval().requires_grad_(False)
    student = student_of(teacher).train()
    teacher.to(getattr(torch, a.teacher_dtype))
    ids = torch.tensor(tok(open(a.data, encoding="utf-8").read())["input_ids"], dtype=torch.long)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.01)
    times = []
    for step in range(a.warmup + a.steps):
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,))
        window = torch.stack([ids[s : s + a.seq + 1] for s in starts.tolist()])
        x, y = window[:, :-1], window[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.student_dtype == "bfloat16"):
            logits = student(input_ids=x).logits
        logits = logits.float()
        if a.mode == "kd":
            with torch.no_grad():
                target = teacher(input_ids=x).logits.float()
            loss = kd_loss(logits, target, y)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        loss = loss.item()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
        print(f"transformers {a.mode} step {step + 1}: {dt * 1e3:.0f} ms, loss {loss:.4f}", flush=True)
    ms = statistics.median(times) * 1e3
    print(
        f"transformers {a.mode} median: {ms:.1f} ms/step, {a.batch * a.seq / ms * 1e3:.0f} tokens/s "
        f"(batch {a.batch} x {a.seq}, teacher {a.teacher_dtype}, student {a.student_dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
