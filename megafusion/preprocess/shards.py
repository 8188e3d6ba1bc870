"""Shards: the plan (contiguous record ranges), the per-shard writer, and the done-marker that makes a shard count
as finished.

The plan depends only on the inputs and --records-per-shard, never on the worker count, so 1 or N workers write
the same shards and merging them in order gives byte-identical datasets. A shard's files are
``shards/shard-NNNNN.{tokens,latents}.{bin,idx}`` and ``.rejects.jsonl``; it is finished only when all of them were
fsynced and ``shard-NNNNN.done.json`` (its counts and file sizes) was written under a temp name, fsynced and renamed.
A resumed run trusts a shard whose marker exists and whose file sizes match it, and rewrites any other from scratch.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from megafusion.utils.files import fsync_file, write_atomic
from megafusion.preprocess.documents import Document, Reject, Result
from megafusion.preprocess.records import count_rows
from megafusion.preprocess.rejects import empty_counts, reject_line

SHARD_FILES = ("tokens.bin", "tokens.idx", "latents.bin", "latents.idx", "rejects.jsonl")


@dataclass
class Segment:
    input_index: int
    start: int  # first local row
    stop: int  # one past the last local row
    byte_offset: Optional[int] = None  # JSONL: where row `start` begins


@dataclass
class ShardSpec:
    index: int
    start: int  # global record range [start, stop)
    stop: int
    segments: List[Segment] = field(default_factory=list)


def plan_shards(inputs: List[str], records_per_shard: int) -> List[ShardSpec]:
    counts, offsets, total = [], [], 0
    for path in inputs:
        n, off = count_rows(path, records_per_shard, total)
        counts.append(n)
        offsets.append(off)
        total += n
    shards: List[ShardSpec] = []
    first = 0  # global index of the first row of input i
    for i, n in enumerate(counts):
        local = 0
        while local < n:
            global_row = first + local
            if global_row % records_per_shard == 0 or not shards:
                shards.append(ShardSpec(len(shards), global_row, global_row))
            shard = shards[-1]
            stop_local = min(n, local + records_per_shard - (global_row - shard.start))
            shard.segments.append(Segment(i, local, stop_local, offsets[i].get(local)))
            shard.stop = first + stop_local
            local = stop_local
        first += n
    return shards


def shard_prefix(shards_dir: str, index: int) -> str:
    return os.path.join(shards_dir, f"shard-{index:05d}")


def done_marker(shards_dir: str, index: int) -> str:
    return shard_prefix(shards_dir, index) + ".done.json"


def finished_stats(shards_dir: str, index: int) -> Optional[dict]:
    """The stats of a finished shard, or None when it must be (re)written."""
    marker = done_marker(shards_dir, index)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker) as f:
            stats = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    prefix = shard_prefix(shards_dir, index)
    for name, size in stats.get("file_bytes", {}).items():
        path = f"{prefix}.{name}"
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    return stats


@dataclass
class ShardStats:
    index: int
    records_read: int = 0
    documents: int = 0
    tokens: int = 0
    images: int = 0
    frames: int = 0
    rejected: int = 0
    rejected_by_reason: Dict[str, int] = field(default_factory=empty_counts)
    file_bytes: Dict[str, int] = field(default_factory=dict)
    max_token_id: int = -1  # the largest token id written (-1: none); the manifest records it for tokens.bin


class ShardWriter:
    """Writes one shard with megatron's IndexedDatasetBuilder (tokens int32, latents in the storage dtype)."""

    def __init__(self, shards_dir: str, index: int, latent_np_dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = shard_prefix(shards_dir, index)
        for stale in glob.glob(glob.escape(self.prefix) + ".*"):
            os.remove(stale)
        self.latent_np_dtype = latent_np_dtype
        self.tokens = IndexedDatasetBuilder(self.prefix + ".tokens.bin", dtype=np.int32)
        self.latents = IndexedDatasetBuilder(self.prefix + ".latents.bin", dtype=latent_np_dtype)
        self.rejects = open(self.prefix + ".rejects.jsonl", "w", encoding="ascii")
        self.stats = ShardStats(index)

    def add(self, result: Result) -> None:
        s = self.stats
        s.records_read += 1
        if isinstance(result, Reject):
            self.rejects.write(reject_line(result.source, result.row, result.error))
            s.rejected += 1
            s.rejected_by_reason[result.error.reason] += 1
            return
        assert isinstance(result, Document)
        self.tokens.add_document(result.tokens, [int(result.tokens.size)])
        k = result.latents.shape[0]
        if k:
            self.latents.add_document(result.latents.reshape(-1), [int(result.latents.shape[1])] * k)
        else:
            self.latents.end_document()
        s.documents += 1
        s.tokens += int(result.tokens.size)
        if result.tokens.size:
            s.max_token_id = max(s.max_token_id, int(result.tokens.max()))
        s.images += result.images
        s.frames += result.frames

    def finish(self) -> dict:
        """Finalize both datasets, fsync every file, then publish the done-marker (temp name + rename)."""
        self.tokens.finalize(self.prefix + ".tokens.idx")
        self.latents.finalize(self.prefix + ".latents.idx")
        self.rejects.close()
        for name in SHARD_FILES:
            path = f"{self.prefix}.{name}"
            fsync_file(path)
            self.stats.file_bytes[name] = os.path.getsize(path)
        stats = asdict(self.stats)
        write_atomic(self.prefix + ".done.json", json.dumps(stats, sort_keys=True).encode())
        return stats
