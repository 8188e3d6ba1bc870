"""One preprocessing run end to end: plan shards, run them on N worker processes (or inline for 1), show progress,
merge finished shards in order while the others run, enforce the reject threshold, publish
(megafusion.preprocess.publish).

Resume: the plan (shards/plan.json) carries the run's fingerprint (megafusion.preprocess.options); re-running the
same command skips shards whose done-marker is valid and rewrites the rest; a folder whose manifest has the same
fingerprint is already complete and is left as it is. Workers get contiguous record ranges (shards) and never
share files, so the merged dataset is byte-identical for any worker count.
"""

from __future__ import annotations

import gc
import json
import os
import queue as queue_module
import shutil
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Tuple

from megafusion.utils.files import write_atomic
from megafusion.preprocess.documents import DocumentBuilder, latent_storage
from megafusion.preprocess.options import PreprocessOptions
from megafusion.preprocess.publish import (FORMAT_VERSION, ShardMerger, file_entries, merge_rejects, read_manifest,
                                           remove_published, sum_stats, write_manifest)
from megafusion.preprocess.records import iter_rows
from megafusion.preprocess.rejects import empty_counts
from megafusion.preprocess.shards import (Segment, ShardSpec, ShardWriter, finished_stats, plan_shards)
from megafusion.preprocess.tokenization import TextTokenizer


class PreprocessError(RuntimeError):
    """The run cannot produce a dataset (too many rejects, shards of another command, a failing worker)."""


# ---------------------------------------------------------------------------------------------------- one shard
_WORKER = {}  # per worker process: options, shards folder, progress queue, document builder


def make_builder(opts: PreprocessOptions) -> DocumentBuilder:
    from megafusion.encoders import build_encoder

    return DocumentBuilder(TextTokenizer(opts.tokenizer), build_encoder(opts.encoder, **opts.encoder_config),
                           opts.columns, opts.kind, opts.seq_length, opts.patch_size, opts.min_image_size,
                           opts.latent_dtype)


def process_shard(builder: DocumentBuilder, opts: PreprocessOptions, spec: ShardSpec, shards_dir: str,
                  report: Callable[[int, int], None]) -> dict:
    """Encode the records of one shard into its files and publish its done-marker; returns its stats."""
    writer = ShardWriter(shards_dir, spec.index, latent_storage(opts.latent_dtype)[1])
    chunk = []

    def flush():
        results = builder.build(chunk)
        images = 0
        for result in results:
            writer.add(result)
            images += getattr(result, "images", 0) + getattr(result, "frames", 0)
        report(len(chunk), images)
        chunk.clear()

    for seg in spec.segments:
        path = opts.inputs[seg.input_index]
        for raw in iter_rows(path, seg.start, seg.stop, opts.columns, seg.byte_offset):
            chunk.append(raw)
            if len(chunk) == opts.chunk_records:
                flush()
    if chunk:
        flush()
    return writer.finish()


def _init_worker(opts: PreprocessOptions, shards_dir: str, progress) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    _WORKER.clear()  # a forked worker must not inherit a builder of another run
    _WORKER.update(opts=opts, shards_dir=shards_dir, progress=progress)


def _worker_task(spec: ShardSpec) -> dict:
    progress = _WORKER["progress"]
    if "builder" not in _WORKER:
        _WORKER["builder"] = make_builder(_WORKER["opts"])
    return process_shard(_WORKER["builder"], _WORKER["opts"], spec, _WORKER["shards_dir"],
                         lambda records, images: progress.put((records, images)))


# ---------------------------------------------------------------------------------------------------- the run
class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="rec", desc="preprocess", disable=not enabled,
                        dynamic_ncols=True, smoothing=0.1)
        self.start, self.images = time.monotonic(), 0

    def __call__(self, records: int, images: int) -> None:
        self.images += images
        self.bar.update(records)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.images / elapsed:.1f} img/s", refresh=False)

    def close(self):
        self.bar.close()


def _run_pending(opts: PreprocessOptions, pending: List[ShardSpec], shards_dir: str, progress: _Progress,
                 finished: Callable[[int], None]) -> None:
    """Encode the pending shards; `finished(index)` is called in this process as each one completes."""
    if not pending:
        return
    if opts.workers == 1:
        if opts.threads_per_worker:
            import torch

            torch.set_num_threads(opts.threads_per_worker)
        builder = make_builder(opts)
        for spec in pending:
            process_shard(builder, opts, spec, shards_dir, progress)
            finished(spec.index)
        return
    import multiprocessing as mp

    ctx = mp.get_context(opts.start_method)
    updates = ctx.Queue()

    def drain():
        while True:
            try:
                progress(*updates.get_nowait())
            except queue_module.Empty:
                return

    # ProcessPoolExecutor (not multiprocessing.Pool): a worker killed by the OS fails its futures with
    # BrokenProcessPool instead of leaving the run waiting forever. gc.freeze() keeps the children's garbage
    # collector off the parent's objects, which would otherwise copy the parent's heap page by page after fork.
    gc.freeze()
    try:
        _run_pool(opts, pending, shards_dir, ctx, updates, drain, finished)
    finally:
        gc.unfreeze()
    drain()


def _run_pool(opts, pending, shards_dir, ctx, updates, drain, finished) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(min(opts.workers, len(pending)), mp_context=ctx, initializer=_init_worker,
                             initargs=(opts, shards_dir, updates)) as pool:
        futures = {pool.submit(_worker_task, spec): spec for spec in pending}
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=0.1, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                spec, exc = futures[future], future.exception()
                if exc is not None:
                    for other in remaining:
                        other.cancel()
                    raise PreprocessError(f"worker failed on shard {spec.index} (records {spec.start}.."
                                          f"{spec.stop - 1}): {type(exc).__name__}: {exc}") from exc
                finished(spec.index)


def _load_or_write_plan(opts: PreprocessOptions, shards_dir: str, fingerprint: str) -> List[ShardSpec]:
    plan_path = os.path.join(shards_dir, "plan.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
        if plan.get("fingerprint") == fingerprint:
            return [ShardSpec(s["index"], s["start"], s["stop"], [Segment(**g) for g in s["segments"]])
                    for s in plan["shards"]]
        if not opts.overwrite:
            raise PreprocessError(f"{shards_dir} holds shards of a different command (inputs, tokenizer, encoder or "
                                  f"settings changed); pass --overwrite to discard them or choose another --output")
        shutil.rmtree(shards_dir)
    os.makedirs(shards_dir, exist_ok=True)
    shards = plan_shards(opts.inputs, opts.records_per_shard)
    write_atomic(plan_path, json.dumps({"fingerprint": fingerprint, "shards": [asdict(s) for s in shards]},
                                       sort_keys=True).encode())
    return shards


def _log(message: str) -> None:
    print(f"[preprocess] {message}", file=sys.stderr, flush=True)


def _encode_merge_publish(opts: PreprocessOptions, shards: List[ShardSpec], pending: List[ShardSpec],
                          shards_dir: str, storage_dtype, progress: _Progress) -> Tuple[dict, dict, dict]:
    """Encode the pending shards while merging finished ones in order, enforce the reject threshold, publish the
    data files. Returns the counts, the rejects by reason and the manifest's `files` entries."""
    merger = ShardMerger(opts.output, shards_dir, len(shards), storage_dtype)
    try:
        waiting = {spec.index for spec in pending}
        for spec in shards:
            if spec.index not in waiting:  # finished by an earlier run
                merger.shard_finished(spec.index)
        try:
            _run_pending(opts, pending, shards_dir, progress, merger.shard_finished)
        finally:
            progress.close()
        stats = []
        for spec in shards:
            s = finished_stats(shards_dir, spec.index)
            if s is None:
                raise PreprocessError(f"shard {spec.index} has no valid done-marker after its worker finished")
            stats.append(s)
        totals = sum_stats(stats)
        counts, by_reason = totals["counts"], {**empty_counts(), **totals["rejected_by_reason"]}
        merge_rejects(opts.output, shards_dir, len(shards))
        fraction = counts["rejected"] / max(counts["records_read"], 1)
        if fraction > opts.max_reject_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in by_reason.items() if v)
            raise PreprocessError(
                f"{counts['rejected']} of {counts['records_read']} records rejected ({fraction:.1%}) exceeds "
                f"--max-reject-fraction {opts.max_reject_fraction} ({reasons}); see "
                f"{os.path.join(opts.output, 'rejects.jsonl')}. No dataset was published; fix the inputs or raise "
                f"the threshold (finished shards are reused on the next run)")
        digests = merger.publish()
        return counts, by_reason, file_entries(opts.output, digests, stats)
    except BaseException:
        merger.discard()
        raise


def run_preprocess(opts: PreprocessOptions) -> dict:
    """Run (or resume) preprocessing; returns the published manifest. A run that fails before any shard finished
    removes the output folder it created (no empty or half-made folder is left to look like a dataset); a run that
    finished shards keeps them, so re-running the same command resumes."""
    created = not os.path.exists(opts.output)
    try:
        return _run_preprocess(opts)
    except BaseException:
        shards_dir = os.path.join(opts.output, "shards")
        finished = os.path.isdir(shards_dir) and any(n.endswith(".done.json") for n in os.listdir(shards_dir))
        if created and not finished and not os.path.isfile(os.path.join(opts.output, "manifest.json")):
            shutil.rmtree(opts.output, ignore_errors=True)
        raise


def _run_preprocess(opts: PreprocessOptions) -> dict:
    from megafusion.encoders import build_encoder

    os.makedirs(opts.output, exist_ok=True)
    tokenizer = TextTokenizer(opts.tokenizer)
    encoder = build_encoder(opts.encoder, **opts.encoder_config)  # description only: models load in the workers
    storage_name, storage_dtype = latent_storage(opts.latent_dtype)
    DocumentBuilder(tokenizer, encoder, opts.columns, opts.kind, opts.seq_length, opts.patch_size,
                    opts.min_image_size, opts.latent_dtype)  # validates patch size against the latent grid
    fingerprint = opts.fingerprint(encoder.config, tokenizer.sha256)

    existing = read_manifest(opts.output)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            _log(f"{opts.output} is already complete (same inputs and settings); nothing to do")
            if not opts.keep_shards:  # a run killed between publishing and cleaning up
                shutil.rmtree(os.path.join(opts.output, "shards"), ignore_errors=True)
            return existing
        if not opts.overwrite:
            raise PreprocessError(f"{opts.output} already holds a dataset made by a different command; pass "
                                  f"--overwrite to replace it or choose another --output")
    remove_published(opts.output)

    shards_dir = os.path.join(opts.output, "shards")
    shards = _load_or_write_plan(opts, shards_dir, fingerprint)
    done = {s.index: finished_stats(shards_dir, s.index) for s in shards}
    pending = [s for s in shards if done[s.index] is None]
    total = shards[-1].stop if shards else 0
    if total == 0:
        raise PreprocessError(f"--input {opts.inputs}: no records to preprocess")
    if len(pending) < len(shards):
        _log(f"resuming: {len(shards) - len(pending)} of {len(shards)} shards already finished")
    progress = _Progress(total, sum(s.stop - s.start for s in shards if done[s.index] is not None), opts.progress)
    counts, by_reason, files = _encode_merge_publish(opts, shards, pending, shards_dir, storage_dtype, progress)
    inputs = []
    for i, path in enumerate(opts.inputs):
        inputs.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                       "records": sum(g.stop - g.start for s in shards for g in s.segments if g.input_index == i)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": {"name": opts.encoder, "config": encoder.config},
        "latent_shape": list(encoder.latent_shape),
        "latent_dtype": opts.latent_dtype,
        "latent_storage": storage_name,
        "patch_size": opts.patch_size,
        "tokenizer": tokenizer.describe(),
        "counts": counts,
        "rejected_by_reason": by_reason,
        "files": files,
        "inputs": inputs,
        "options": opts.settings(),
        "fingerprint": fingerprint,
        "command": opts.command or "megafusion.preprocess.run_preprocess",
    }
    write_manifest(opts.output, manifest)
    if not opts.keep_shards:
        shutil.rmtree(shards_dir, ignore_errors=True)
    _log(f"wrote {opts.output}: {counts['documents']} documents, {counts['tokens']} tokens, {counts['images']} "
         f"images, {counts['frames']} frames; {counts['rejected']} of {counts['records_read']} records rejected")
    return manifest


__all__ = ["run_preprocess", "process_shard", "make_builder", "PreprocessError"]
