# The PyTorch + transformers peer of retort's SmolLM2 KD step on a GPU: teacher = a llama of
# SmolLM2-135M's shapes (30 blocks, width 576, 9 heads / 3 KV heads, vocab 49152), student = 4
# of its blocks (0, 10, 19, 29) with its embedding, final norm and tied head, as retort's
# `init = { from_teacher = true, layers = [0, 10, 19, 29] }`. Loss 0.7 * T^2 KL(T=2) + 0.3 CE,
# AdamW, eager mode. Prints one JSON line: tokens/s (median step), peak memory.
#
#   python3 torch_kd_smollm2.py --save-teacher DIR      # random teacher as a Hugging Face dir
#   python3 torch_kd_smollm2.py --teacher DIR --steps 20 --batch 8 --seq 256 [--dtype bf16]
import argparse, json, statistics, time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, hidden_act="silu")
LAYERS = [0, 10, 19, 29]


def student_of(teacher, dtype):
    cfg = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": len(LAYERS)})
    student = LlamaForCausalLM(cfg).to(dtype)
    sd = teacher.state_dict()
    new = {}
    for k in student.state_dict():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            new[k] = sd[k.replace(f"model.layers.{i}.", f"model.layers.{LAYERS[i]}.", 1)]
        else:
            new[k] = sd[k]
    student.load_state_dict(new)
    return student


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher")
    ap.add_argument("--save-teacher")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    # bf16: every weight and the optimizer in bf16; amp: f32 weights and optimizer, the
    # forward under torch.autocast(bf16) (mixed precision, as retort's student.dtype = "bf16").
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "amp"])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.save_teacher:
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
        model.save_pretrained(a.save_teacher, safe_serialization=True)
        print(json.dumps({"saved": a.save_teacher}))
        return
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "amp")
    dev = torch.device(a.device)
    teacher = (LlamaForCausalLM.from_pretrained(a.teacher, torch_dtype=dtype) if a.teacher
               else LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dtype)).to(dev).eval()
    student = student_of(teacher, dtype).to(dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01)
    T, V = 2.0, SMOLLM2["vocab_size"]
    times = []
    torch.cuda.reset_peak_memory_stats(dev)
    for i in range(a.steps + a.warmup):
        d = torch.randint(0, V, (a.batch, a.seq + 1), device=dev)
        x, y = d[:, :-1], d[:, 1:]
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            zt = teacher(x).logits.float()
        with autocast:
            zs = student(x).logits.float()
        kl = F.kl_div(F.log_softmax(zs / T, -1).reshape(-1, V), F.log_softmax(zt / T, -1).reshape(-1, V),
                      log_target=True, reduction="batchmean")
        ce = F.cross_entropy(zs.reshape(-1, V), y.reshape(-1))
        loss = 0.7 * T * T * kl + 0.3 * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize(dev)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(json.dumps({
        "peer": "transformers+pytorch eager", "torch": torch.__version__, "dtype": a.dtype,
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "median_step_ms": round(step * 1e3, 2),
        "tokens_per_s": round(a.batch * a.seq / step, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 3),
        "loss_end": float(loss)}))


if __name__ == "__main__":
    main()
