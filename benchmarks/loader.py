"""Benchmark: tokens/s delivered by the data loader vs a raw np.memmap read of the same bytes, in one run.

    python benchmarks/loader.py [--docs 3000] [--seq-length 4096] [--workers 1] [--storage float32]

Writes a temporary dataset folder (text-only, captioned-image, interleaved and video documents) in the
docs/DATA_FORMAT.md layout, then measures
  loader:   build_data_iterators(...) batches (planning, reading, patchify, collate; background workers as given,
            and in-process) -> non-padding positions per second;
  baseline: for the very segments those batches hold, np.array(np.memmap[...]) copies of the token and latent
            bytes, i.e. the same bytes read in the same order with no packing or collation.
The last line is JSON: {"name": "loader", "ratio": loader_tok_s / memmap_tok_s, "target": 0.5, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fixtures import write_dataset  # noqa: E402

from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from megafusion.data.loader import build_data_iterators  # noqa: E402
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST  # noqa: E402


def make_docs(rng, n, shape, vocab=32000):
    docs = []
    for _ in range(n):
        kind = rng.choice(["text", "image", "interleaved", "video"], p=[0.3, 0.4, 0.2, 0.1])
        text = lambda k: rng.integers(ST.num_reserved, vocab, size=k).tolist()  # noqa: E731
        toks, frames = [ST.bos], 0
        if kind == "text":
            toks += text(int(rng.integers(100, 3000)))
        elif kind == "image":
            toks += text(int(rng.integers(10, 80))) + [ST.boi, ST.frame, ST.eoi]
            frames = 1
        elif kind == "interleaved":
            for _ in range(int(rng.integers(2, 4))):
                toks += text(int(rng.integers(20, 200))) + [ST.boi, ST.frame, ST.eoi]
                frames += 1
        else:
            k = int(rng.integers(2, 6))
            toks += text(int(rng.integers(10, 60))) + [ST.boi] + [ST.frame] * k + [ST.eoi]
            frames = k
        toks.append(ST.eos)
        docs.append((toks, rng.standard_normal((frames,) + shape).astype(np.float32)))
    return docs


def time_loader(cfg, n_batches, warmup=2):
    it, _ = build_data_iterators(cfg, 0, 1, 0)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    positions = 0
    for _ in range(n_batches):
        positions += int(np.count_nonzero(next(it).document_ids.numpy() >= 0))
    dt = time.perf_counter() - t0
    plans = [it.source.plan(i) for i in range(warmup * cfg.training.micro_batch_size,
                                               (warmup + n_batches) * cfg.training.micro_batch_size)]
    it.close()
    return positions, dt, plans


def time_memmap(folder, dataset, plans):
    """Copy the same token and latent bytes from plain np.memmaps, segment by segment."""
    tok = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.int32, mode="r")
    lat = np.memmap(os.path.join(folder, "latents.bin"), dtype=dataset._lat_np_dtype, mode="r")
    tok_ptr = dataset._tokens.index.sequence_pointers // 4
    lat_ptr = dataset._latents.index.sequence_pointers // lat.itemsize
    lat_docs = dataset._latents.document_indices
    numel = int(np.prod(dataset.latent_shape))
    frame = ST.frame
    t0 = time.perf_counter()
    nbytes = 0
    for _, plan in plans:
        for doc, start, end, first in plan.tolist():
            t = np.array(tok[tok_ptr[doc] + start: tok_ptr[doc] + end])
            nf = int(np.count_nonzero(t == frame))
            nbytes += t.nbytes
            if nf:
                a = lat_ptr[lat_docs[doc] + first]
                nbytes += np.array(lat[a: a + nf * numel]).nbytes
    return time.perf_counter() - t0, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--latent-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--storage", default="float32", choices=["float32", "bfloat16-as-uint16"])
    args = ap.parse_args()

    shape = (args.channels, args.latent_size, args.latent_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dataset(os.path.join(tmp, "ds"), make_docs(np.random.default_rng(0), args.docs, shape),
                               shape, storage=args.storage)

        def cfg(workers):
            return Config(
                model=ModelConfig(latent_channels=args.channels, latent_size=args.latent_size,
                                  patch_size=args.patch_size, vocab_size=32000),
                data=DataConfig(seq_length=args.seq_length, paths=[folder], valid_fraction=0.0, num_workers=workers),
                training=TrainingConfig(micro_batch_size=args.micro_batch_size,
                                        global_batch_size=args.micro_batch_size),
            )

        time_loader(cfg(0), 4)  # warm the page cache
        results = {}
        for workers in sorted({0, args.workers}):
            best = None
            for _ in range(2):
                positions, dt, plans = time_loader(cfg(workers), args.batches)
                if best is None or dt < best[1]:
                    best = (positions, dt, plans)
            results[workers] = best
        positions, _, plans = results[args.workers]
        from megafusion.data.indexed import MultimodalDataset

        ds = MultimodalDataset(folder)
        mm_dt = min(time_memmap(folder, ds, plans)[0] for _ in range(3))
        _, nbytes = time_memmap(folder, ds, plans)
        mm_tok_s = positions / mm_dt
        out = {"name": "loader", "target": 0.5}
        for workers, (pos, dt, _) in results.items():
            tok_s = pos / dt
            out[f"loader_tok_s_workers{workers}"] = round(tok_s)
            out[f"ratio_workers{workers}"] = round(tok_s / mm_tok_s, 4)
            print(f"loader (num_workers={workers}): {pos} positions in {dt:.3f}s = {tok_s:,.0f} tok/s")
        print(f"memmap copy of the same {nbytes / 2**20:.1f} MiB: {mm_dt:.4f}s = {mm_tok_s:,.0f} tok/s")
        out["ratio"] = out[f"ratio_workers{args.workers}"]
        out.update(memmap_tok_s=round(mm_tok_s), workers=args.workers, seq_length=args.seq_length,
                   micro_batch_size=args.micro_batch_size, latent_shape=list(shape), patch_size=args.patch_size,
                   storage=args.storage, MiB=round(nbytes / 2**20, 1), cpu_count=os.cpu_count())
        print(json.dumps(out))


if __name__ == "__main__":
    main()
