"""Benchmark: hybrid attention fwd+bwd, `segmented` vs dense-mask SDPA (the `dense` backend) vs plain causal SDPA.

Default shape: one row of S=2048 positions, 8 heads of dim 64, half the positions in two images
(text 256 | image 512 | text 256 | image 512 | text 512). Candidates alternate inside every repetition so
machine noise hits them alike; each reports the median of the repetitions after warmup. Causal SDPA is not
the hybrid mask (it misses the image blocks' bidirectional half) and is only the speed floor.

    python benchmarks/attention.py [--seq-length 2048 --heads 8 --head-dim 64 --reps 15 --threads 1 --device cpu]

Prints human lines, then as the last line one JSON object: ratio = dense / segmented time (target >= 1.5),
vs_causal = segmented / causal time (target <= 1.05), both from wall-clock medians, the same two from
process CPU time (cpu_time_*; steadier on a shared, oversubscribed machine), and max_abs_err of segmented
vs dense over the output and dq, dk, dv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "model"))

from layouts import crafted_layout  # noqa: E402

from megafusion.model.attention.dense import dense_attention  # noqa: E402
from megafusion.model.attention.segmented import segmented_attention  # noqa: E402


def default_spec(s: int) -> str:
    """Half of s in two images, text around and between them (quarters of the text half)."""
    img, txt = s // 4, s // 8
    return f"t{txt} i{img} t{txt} i{img} t{s - 2 * img - 2 * txt}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query: key/value heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default=None, help="row spec as in tests/model/layouts.py (default: 2 images)")
    p.add_argument("--hide-noised", action="store_true")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: leave torch's default). 1 by default: on a shared, oversubscribed "
                        "machine every OpenMP barrier of a multi-threaded op stalls on a descheduled thread, which "
                        "measures the neighbours rather than the kernels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    s, b, h, d = args.seq_length, args.batch, args.heads, args.head_dim
    kv = args.kv_heads or h
    spec = args.layout or default_spec(s)
    layout = crafted_layout([spec] * b, s, hide_noised=args.hide_noised)
    layout = type(layout)(**{f: getattr(layout, f).to(device) for f in
                             ("block_ids", "context_start", "valid", "noised", "modality")},
                          hide_noised=layout.hide_noised)
    scale = d**-0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, generator=gen).to(device, dtype).requires_grad_() for n in (h, kv, kv))
    grad = torch.randn(b, h, s, d, generator=gen).to(device, dtype)

    candidates = {
        "dense": lambda: dense_attention(q, k, v, layout, scale),
        "segmented": lambda: segmented_attention(q, k, v, layout, scale),
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=kv != h),
    }

    def fwd_bwd(fn):
        out = fn()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        return out, dq, dk, dv

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ref = fwd_bwd(candidates["dense"])
    got = fwd_bwd(candidates["segmented"])
    max_abs_err = max((a.float() - b_.float()).abs().max().item() for a, b_ in zip(ref, got))

    times = {name: [] for name in candidates}
    cpu_times = {name: [] for name in candidates}  # process CPU time: less sensitive to a shared machine
    for rep in range(args.warmup + args.reps):
        for name, fn in candidates.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(fn)
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    cpu = {name: statistics.median(t) * 1e3 for name, t in cpu_times.items()}
    ratio = med["dense"] / med["segmented"]
    vs_causal = med["segmented"] / med["causal"]

    print(f"layout: {spec}  (b={b}, s={s}, heads={h}/{kv}, head_dim={d}, {args.dtype}, {device}, "
          f"threads={torch.get_num_threads()}, hide_noised={args.hide_noised})")
    for name, ms in med.items():
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        print(f"  {name:10s} fwd+bwd median {ms:9.2f} ms  (min {lo:.2f}, max {hi:.2f}, {args.reps} reps; "
              f"CPU time {cpu[name]:.2f} ms)")
    print(f"  dense / segmented = {ratio:.3f} (target >= 1.5); segmented / causal = {vs_causal:.3f} "
          f"(target <= 1.05); max |segmented - dense| over out, dq, dk, dv = {max_abs_err:.2e}")
    print(json.dumps({
        "name": "attention", "ratio": round(ratio, 4), "target": 1.5, "vs_causal": round(vs_causal, 4),
        "vs_causal_target": 1.05, "max_abs_err": max_abs_err, "dense_ms": round(med["dense"], 3),
        "segmented_ms": round(med["segmented"], 3), "causal_ms": round(med["causal"], 3),
        "cpu_time_ratio": round(cpu["dense"] / cpu["segmented"], 4),
        "cpu_time_vs_causal": round(cpu["segmented"] / cpu["causal"], 4), "seq_length": s,
        "batch": b, "heads": h, "kv_heads": kv, "head_dim": d, "layout": spec, "device": str(device),
        "dtype": args.dtype, "reps": args.reps,
    }))


if __name__ == "__main__":
    main()
