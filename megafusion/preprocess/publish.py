"""The end of a run: merge finished shards in order into the dataset folder and publish it.

Shards are concatenated with megatron's IndexedDatasetBuilder.add_index (format reused, not rewritten) into temp
names (``*.partial``); every file is fsynced and renamed, the .idx files after the .bin files, and manifest.json
last (temp name, fsync, rename), so a run killed at any point never leaves a folder that looks complete.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from typing import Dict, List

import numpy as np

from megafusion.utils.files import file_sha256, fsync_file, publish_file, write_atomic
from megafusion.preprocess.shards import shard_prefix

FORMAT_VERSION = 1
DATA_FILES = ("tokens.bin", "tokens.idx", "latents.bin", "latents.idx")


def merge_rejects(output: str, shards_dir: str, num_shards: int) -> str:
    """Concatenate the shards' rejects in order and publish rejects.jsonl; returns its path."""
    tmp = os.path.join(output, "rejects.jsonl.partial")
    with open(tmp, "wb") as out:
        for i in range(num_shards):
            with open(shard_prefix(shards_dir, i) + ".rejects.jsonl", "rb") as f:
                shutil.copyfileobj(f, out)
    final = os.path.join(output, "rejects.jsonl")
    publish_file(tmp, final)
    return final


def merge_datasets(output: str, shards_dir: str, num_shards: int, latent_np_dtype) -> None:
    """Merge shard datasets into tokens.{bin,idx} and latents.{bin,idx} (the .idx files renamed last)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    partial = []
    # add_index runs gc.collect() once per shard, which costs ~0.5 s in a process holding torch + megatron;
    # freezing the objects alive now makes those collections cheap without changing what is written.
    gc.freeze()
    try:
        for name, dtype in (("tokens", np.int32), ("latents", latent_np_dtype)):
            bin_tmp = os.path.join(output, f"{name}.bin.partial")
            idx_tmp = os.path.join(output, f"{name}.idx.partial")
            builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
            for i in range(num_shards):
                builder.add_index(f"{shard_prefix(shards_dir, i)}.{name}")
            builder.finalize(idx_tmp)
            partial += [(bin_tmp, f"{name}.bin"), (idx_tmp, f"{name}.idx")]
    finally:
        gc.unfreeze()
    for tmp, _ in partial:
        fsync_file(tmp)
    for tmp, final in sorted(partial, key=lambda p: p[1].endswith(".idx")):  # .bin first, .idx last
        publish_file(tmp, os.path.join(output, final))


def file_entries(output: str) -> Dict[str, dict]:
    entries = {}
    for name in DATA_FILES + ("rejects.jsonl",):
        path = os.path.join(output, name)
        entries[name] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    return entries


def write_manifest(output: str, manifest: dict) -> str:
    path = os.path.join(output, "manifest.json")
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_manifest(output: str):
    path = os.path.join(output, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def remove_published(output: str) -> None:
    """Remove a previous dataset (manifest first, so the folder stops looking complete at once)."""
    for name in ("manifest.json",) + DATA_FILES + ("rejects.jsonl",):
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)


def sum_stats(stats: List[dict]) -> dict:
    counts = {"documents": 0, "tokens": 0, "images": 0, "frames": 0, "records_read": 0, "rejected": 0}
    by_reason: Dict[str, int] = {}
    for s in stats:
        for key in counts:
            counts[key] += s[key]
        for reason, n in s["rejected_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    return {"counts": counts, "rejected_by_reason": dict(sorted(by_reason.items()))}
