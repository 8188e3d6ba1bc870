"""Benchmark: tokens/s delivered by the data loader vs a raw np.memmap read of the same bytes, in one run.

    python benchmarks/loader.py [--docs 3000] [--seq-length 4096] [--workers 2] [--storage float32]

Writes a temporary dataset folder (text-only, captioned-image, interleaved and video documents; Transfusion-like
latents [8, 32, 32], patch 2 -> 256 patches of 32 values per image) in the docs/DATA_FORMAT.md layout, then,
in rounds of --batches micro-batches, side by side so load spikes of a shared machine hit both:
  loader:   build_data_iterators(...) batches (planning, reading, patchify, collate; in-process and with
            --workers background processes) -> non-padding positions per second;
  baseline: for the very segments those batches hold, np.array(np.memmap[...]) copies of the token and latent
            bytes, i.e. the same bytes read in the same order with no packing or collation.
Each round takes its batches one at a time and drops them, as a training loop with one micro-batch per step does;
the batches background workers prefetched while the baseline ran are taken untimed first, so the rounds measure
steady-state delivery, not a full buffer.
Ratios (median over rounds): ratio_workersN (wall clock, N = 0 in-process), ratio_cpu_time_workers0 (CPU time
of the process, less sensitive to other load), ratio_main_process_cpu_workersN (what the training process itself
pays per batch when workers build it) and ratio_bound_read_plus_output_write (memmap read / (read + one write of
the delivered Batch's bytes): the best any loader could do, since a Batch holds int64 metadata per position; a
tensor standing for two fields, like latents = noisy_latents, counts once). The last line is JSON:
{"name": "loader", "ratio": <ratio_workers{--workers}>, "target": 0.5, ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from megafusion.data.indexed import MultimodalDataset  # noqa: E402
from megafusion.data.loader import build_data_iterators  # noqa: E402
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST  # noqa: E402
from megafusion.data.workers import PREFETCH  # noqa: E402

KEPT_FOR_WRITE_BOUND = 8  # batches taken after each round to time one write of the delivered output


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


def loader_rounds(cfg, rounds, per_round, warmup=3):
    """Per round: (positions, wall seconds, cpu seconds of this process, plans of the samples, output write
    seconds) for `per_round` consecutive micro-batches of one iterator, taken and dropped one by one as a training
    loop with one micro-batch per step does. Background workers keep building while the baseline runs; the batches
    they prefetched then are taken untimed before each round, so a round measures steady-state delivery rather
    than a full buffer. The output write bound is timed on KEPT_FOR_WRITE_BOUND more batches taken after the round
    (holding them during it would make the loader allocate fresh memory a training loop does not ask for)."""
    it, _ = build_data_iterators(cfg, 0, 1, 0)
    for _ in range(warmup):
        next(it)
    mbs = cfg.training.micro_batch_size
    prefetched = PREFETCH * cfg.data.num_workers
    out = []
    for _ in range(rounds):
        for _ in range(prefetched):
            next(it)
        first = it.consumed_samples
        w0, c0 = time.perf_counter(), time.process_time()
        positions = 0
        for _ in range(per_round):
            batch = next(it)
            positions += int(np.count_nonzero(batch.document_ids.numpy() >= 0))
            del batch
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        kept = [next(it) for _ in range(KEPT_FOR_WRITE_BOUND)]
        write = time_output_write(kept) * per_round / len(kept)
        out.append((positions, wall, cpu, [it.source.plan(i) for i in range(first, first + per_round * mbs)], write))
        del kept
    it.close()
    return out


def time_output_write(batches):
    """Seconds to allocate and write Batch-sized output (every distinct tensor of the delivered batches copied
    once): the memory traffic any loader pays on top of reading, since a Batch holds int64 metadata per position
    (latents and noisy_latents are one tensor in a loader Batch, so they count once)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            seen = set()
            for f in dataclasses.fields(b):
                v = getattr(b, f.name)
                if v is not None and id(v) not in seen:
                    seen.add(id(v))
                    np.copyto(np.empty(v.shape, v.numpy().dtype), v.numpy())
        best = min(best, time.perf_counter() - t0)
    return best


def time_memmap(folder, dataset, plans):
    """Copy the same token and latent bytes from plain np.memmaps, segment by segment."""
    tok = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.int32, mode="r")
    lat = np.memmap(os.path.join(folder, "latents.bin"), dtype=dataset._lat_np_dtype, mode="r")
    tok_ptr = dataset._tokens.index.sequence_pointers // 4
    lat_ptr = dataset._latents.index.sequence_pointers // lat.itemsize
    lat_docs = dataset._latents.document_indices
    numel = int(np.prod(dataset.latent_shape))
    frame = ST.frame
    w0, c0 = time.perf_counter(), time.process_time()
    nbytes = 0
    for _, plan in plans:
        for doc, start, end, first in plan.tolist():
            t = np.array(tok[tok_ptr[doc] + start: tok_ptr[doc] + end])
            nf = int(np.count_nonzero(t == frame))
            nbytes += t.nbytes
            if nf:
                a = lat_ptr[lat_docs[doc] + first]
                nbytes += np.array(lat[a: a + nf * numel]).nbytes
    return time.perf_counter() - w0, time.process_time() - c0, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40, help="micro-batches per timing round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--workers", type=int, default=DataConfig.num_workers, help="default: data.num_workers")
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

        loader_rounds(cfg(0), 1, 4)  # warm the page cache
        ds = MultimodalDataset(folder)
        out = {"name": "loader", "target": 0.5}
        for workers in sorted({0, args.workers}):
            # rounds of the loader and of the memmap baseline on the same samples, side by side, so load spikes
            # on a shared machine hit both; the median round ratio is reported
            wall_ratio, cpu_ratio, pos_total, wall_total, mm_total, nbytes_total = [], [], 0, 0.0, 0.0, 0
            bound = []
            for positions, wall, cpu, plans, write in loader_rounds(cfg(workers), args.rounds, args.batches):
                mm_wall, mm_cpu, nbytes = min((time_memmap(folder, ds, plans) for _ in range(3)),
                                              key=lambda x: x[0])
                wall_ratio.append(mm_wall / wall)
                bound.append(mm_wall / (mm_wall + write))
                cpu_ratio.append(mm_cpu / cpu if cpu > 0 else float("nan"))
                pos_total, wall_total, mm_total, nbytes_total = (pos_total + positions, wall_total + wall,
                                                                 mm_total + mm_wall, nbytes_total + nbytes)
            tok_s, mm_tok_s = pos_total / wall_total, pos_total / mm_total
            out[f"loader_tok_s_workers{workers}"] = round(tok_s)
            out[f"memmap_tok_s_workers{workers}_run"] = round(mm_tok_s)
            out[f"ratio_workers{workers}"] = round(float(np.median(wall_ratio)), 4)
            if workers == 0:  # CPU time is only comparable when all the work is in this process
                out["ratio_cpu_time_workers0"] = round(float(np.median(cpu_ratio)), 4)
            else:  # what the training process itself pays per batch (receiving, wrapping), workers do the rest
                out[f"ratio_main_process_cpu_workers{workers}"] = round(float(np.median(cpu_ratio)), 4)
                # the best any loader could reach: read the bytes once, then write the Batch once
                out["ratio_bound_read_plus_output_write"] = round(float(np.median(bound)), 4)
            print(f"num_workers={workers}: loader {tok_s:,.0f} tok/s, memmap copy of the same "
                  f"{nbytes_total / 2**20:.1f} MiB {mm_tok_s:,.0f} tok/s, median round ratio "
                  f"{np.median(wall_ratio):.3f} (rounds: {' '.join(f'{r:.2f}' for r in wall_ratio)})")
        out["ratio"] = out[f"ratio_workers{args.workers}"]
        out.update(workers=args.workers, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                   latent_shape=list(shape), patch_size=args.patch_size, storage=args.storage,
                   batches_per_round=args.batches, rounds=args.rounds, cpu_count=os.cpu_count(),
                   load_average_1min=round(os.getloadavg()[0], 2))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
