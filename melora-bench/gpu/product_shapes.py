#!/usr/bin/env python3
"""What cuBLAS takes for the matrix products of one Llama-2-7B LoRA training
step (batch 4 x seq 300, r = 8 on q and v), on this machine, through PyTorch:
each product shape timed alone with CUDA events (the median of --iters after
a warm-up), and the step's total from how many times each shape runs
(forward, and the input gradient of the backward pass: the base weights are
frozen, so no weight gradients but the adapters'). The reference the step's
own product time is read against (melora-bench/gpu/profile.sh).

Usage: product_shapes.py [--dtype bfloat16] [--iters 20] [--device cuda]
       [--json OUT.json]
"""
import argparse
import json
import statistics
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--iters", type=int, default=20)
p.add_argument("--device", default="cuda")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=300)
p.add_argument("--layers", type=int, default=32)
p.add_argument("--json")
a = p.parse_args()
dtype = getattr(torch, a.dtype)
dev = torch.device(a.device)
T = a.batch * a.seq
H, I, V, heads, hd, r = 4096, 11008, 32000, 32, 128, 8
L = a.layers
BH = a.batch * heads

# (name, batch of products, m, k, n, times per step): forward, and the
# backward's input gradient (the same FLOPs, the transposed operand).
shapes = [
    ("q, k, v, o projections", 1, T, H, H, 4 * L * 2),
    ("gate, up projections", 1, T, H, I, 2 * L * 2),
    ("down projection", 1, T, I, H, L * 2),
    ("attention scores Q K^T", BH, a.seq, hd, a.seq, L * 3),
    ("attention values P V", BH, a.seq, a.seq, hd, L * 3),
    ("LoRA x A^T (q, v)", 1, T, H, r, 2 * L * 3),
    ("LoRA (x A^T) B^T (q, v)", 1, T, r, H, 2 * L * 3),
    ("output head (all positions)", 1, T, H, V, 2),
]


def timed(fn):
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


rows = []
for name, b, m, k, n, times in shapes:
    x = torch.randn(b, m, k, device=dev, dtype=dtype)
    w = torch.randn(b, k, n, device=dev, dtype=dtype)
    for _ in range(3):
        torch.matmul(x, w)
    secs = statistics.median(timed(lambda: torch.matmul(x, w)) for _ in range(a.iters))
    flops = 2.0 * b * m * k * n
    rows.append({"product": name, "batch": b, "m": m, "k": k, "n": n, "per_step": times,
                 "ms": secs * 1e3, "tflops": flops / secs / 1e12, "ms_per_step": secs * 1e3 * times})
    del x, w

name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
print(f"{name}, torch {torch.__version__}, {a.dtype}, batch {a.batch} x seq {a.seq}, {L} layers")
print()
print("| product | batch x m x k x n | per step | ms each | TFLOP/s | ms per step |")
print("|---|---|---:|---:|---:|---:|")
for r_ in rows:
    print(f"| {r_['product']} | {r_['batch']} x {r_['m']} x {r_['k']} x {r_['n']} | {r_['per_step']} | "
          f"{r_['ms']:.3f} | {r_['tflops']:.0f} | {r_['ms_per_step']:.1f} |")
total = sum(r_["ms_per_step"] for r_ in rows)
print(f"| **all products of a step** | | | | | **{total:.1f}** |")
if a.json:
    json.dump({"device": name, "dtype": a.dtype, "rows": rows, "total_ms": total}, open(a.json, "w"), indent=2)
