"""Benchmark: one denoising step of an image with the cached prefix vs recomputing the whole sequence.

The model (d=512, 8 layers, 8 heads, fp32, random weights) holds a prompt prefix of P text positions and an image
of I = 256 latent positions. The cached step runs only the image's positions against the prefix's cached keys and
values (megafusion.inference.kv_cache, as `megafusion generate` does); the baseline runs prefix + image from
scratch (same attention backend, velocity only, no logits). Both run at prefix:image = 1:1 and 4:1, alternating
inside every repetition so machine noise hits them alike; medians after warmup.

    python benchmarks/denoise_cache.py [--reps 7 --warmup 2 --threads 2]

The ideal speed-up is (P + I) / I (every layer's work is proportional to the positions run, attention too: I x
(P + I) scores instead of (P + I)^2); the target is >= 0.8 of it at both ratios. Last line: one JSON object with
"name", "ratio" (the worse of the two fractions of ideal), "target" 0.8 and the per-ratio numbers, plus the
largest velocity difference between the two paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import megatron_single_process  # noqa: E402

from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from megafusion.inference.kv_cache import CacheGroup, InferenceStep, KVCache  # noqa: E402
from megafusion.inference.runners import Segment, build_batch  # noqa: E402
from megafusion.model import MultimodalModel  # noqa: E402
from megafusion.model.transformer_config import build_transformer_config  # noqa: E402

IMAGE = 256


def build_model(args):
    side = int(IMAGE ** 0.5) * 2  # latent side with patch 2 -> IMAGE patches per frame
    cfg = Config(model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                                   vocab_size=args.vocab, latent_channels=4, latent_size=side, patch_size=2,
                                   transformer_impl="local", attention_backend="segmented"),
                 data=DataConfig(seq_length=8192), training=TrainingConfig(precision="fp32"))
    torch.manual_seed(0)
    return MultimodalModel(build_transformer_config(cfg)).eval()


def one_ratio(model, prefix: int, args) -> dict:
    g = torch.Generator().manual_seed(prefix)
    tokens = torch.randint(16, args.vocab, (prefix,), generator=g).tolist()
    x = torch.randn(IMAGE, model.config.patch_dim, generator=g)
    block = [Segment(latents=x, t=0.4)]
    positions_image = torch.arange(prefix, prefix + IMAGE).view(1, -1)
    cache = KVCache(1, prefix + IMAGE + 1)
    with torch.inference_mode():  # the prefix, once (not timed): what generation keeps between steps
        batch, _ = build_batch([[Segment(tokens=tokens)]], model.config.patch_dim, "cpu")
        step = InferenceStep([CacheGroup(cache, 0, 1)], torch.arange(prefix).view(1, -1), torch.tensor([prefix]))
        model(batch, inference_context=step)
        step.commit()
    image_batch, _ = build_batch([block], model.config.patch_dim, "cpu")
    full_batch, _ = build_batch([[Segment(tokens=tokens)] + block], model.config.patch_dim, "cpu")

    def cached():
        step = InferenceStep([CacheGroup(cache, 0, 1)], positions_image, torch.tensor([0]))
        return model(image_batch, inference_context=step).velocity

    def recompute():
        fresh = KVCache(1, prefix + IMAGE + 1)
        step = InferenceStep([CacheGroup(fresh, 0, 1)], torch.arange(prefix + IMAGE).view(1, -1), torch.tensor([0]))
        return model(full_batch, inference_context=step).velocity

    times = {"cached": [], "recompute": []}
    with torch.inference_mode():
        err = float((cached() - recompute()).abs().max())
        for rep in range(args.warmup + args.reps):
            for name, fn in (("cached", cached), ("recompute", recompute)):
                t0 = time.perf_counter()
                fn()
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    speedup = med["recompute"] / med["cached"]
    ideal = (prefix + IMAGE) / IMAGE
    return {"prefix": prefix, "image": IMAGE, "cached_ms": round(med["cached"], 2),
            "recompute_ms": round(med["recompute"], 2), "speedup": round(speedup, 3), "ideal": ideal,
            "fraction_of_ideal": round(speedup / ideal, 3), "max_abs_velocity_diff": err}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with megatron_single_process():
        model = build_model(args)
        rows = [one_ratio(model, ratio * IMAGE, args) for ratio in (1, 4)]
    for r in rows:
        print(f"prefix {r['prefix']:5d} : image {r['image']}  cached {r['cached_ms']:8.2f} ms  recompute "
              f"{r['recompute_ms']:8.2f} ms  speed-up {r['speedup']:.2f} (ideal {r['ideal']:.1f}, "
              f"{r['fraction_of_ideal']:.2f} of it)  max |dv| {r['max_abs_velocity_diff']:.1e}")
    print(json.dumps({"name": "denoise_cache", "ratio": min(r["fraction_of_ideal"] for r in rows), "target": 0.8,
                      "ratios": rows, "layers": args.layers, "hidden": args.hidden, "dtype": "float32",
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
