"""The end of a run: merge finished shards in order into the dataset folder and publish it.

Shards are concatenated with megatron's IndexedDatasetBuilder.add_index (format reused, not rewritten) into temp
names (``*.partial``), in shard order as they finish (ShardMerger); every file is fsynced and renamed, the .idx
files after the .bin files, and manifest.json last (temp name, fsync, rename), so a run killed at any point never
leaves a folder that looks complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from typing import Dict, List

import numpy as np

from megafusion.utils.files import file_sha256, fsync_file, hash_file_into, publish_file, write_atomic
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


class ShardMerger:
    """Appends finished shards, in shard order, to the dataset's temp files (``*.partial``) as soon as every shard
    before them has finished, hashing each .bin as it is appended; publish() then only writes the .idx files,
    fsyncs and renames. Merging while later shards are still being encoded keeps the serial tail of a multi-worker
    run short. Call shard_finished(i) for every shard (any order), then publish() or, on failure, discard()."""

    def __init__(self, output: str, shards_dir: str, num_shards: int, latent_np_dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.output, self.shards_dir, self.num_shards = output, shards_dir, num_shards
        dtypes = {"tokens": np.int32, "latents": latent_np_dtype}
        self._builders = {name: IndexedDatasetBuilder(self._partial(f"{name}.bin"), dtype=dtype)
                          for name, dtype in dtypes.items()}
        self._digests = {name: hashlib.sha256() for name in dtypes}
        self._finished, self._next = set(), 0

    def _partial(self, name: str) -> str:
        return os.path.join(self.output, f"{name}.partial")

    def shard_finished(self, index: int) -> None:
        self._finished.add(index)
        while self._next in self._finished:
            prefix = shard_prefix(self.shards_dir, self._next)
            # add_index runs gc.collect() once per call, ~0.5 s in a process holding torch + megatron; freezing
            # the objects alive now makes those collections cheap without changing what is written.
            gc.freeze()
            try:
                for name, builder in self._builders.items():
                    builder.add_index(f"{prefix}.{name}")  # appends the whole shard .bin
                    hash_file_into(self._digests[name], f"{prefix}.{name}.bin")
                    # write back now, while workers still encode, rather than all at once in publish()
                    builder.data_file.flush()
                    os.fsync(builder.data_file.fileno())
            finally:
                gc.unfreeze()
            self._next += 1

    def publish(self) -> Dict[str, str]:
        """Write the .idx files and publish the four data files (.bin first, .idx last); returns the .bin sha256s."""
        if self._next != self.num_shards:
            raise RuntimeError(f"{self.output}: only {self._next} of {self.num_shards} shards were merged")
        partial = []
        for name, builder in self._builders.items():
            builder.finalize(self._partial(f"{name}.idx"))
            partial += [(self._partial(f"{name}.bin"), f"{name}.bin"), (self._partial(f"{name}.idx"), f"{name}.idx")]
        for tmp, _ in partial:
            fsync_file(tmp)
        for tmp, final in sorted(partial, key=lambda p: p[1].endswith(".idx")):  # .bin first, .idx last
            publish_file(tmp, os.path.join(self.output, final))
        return {f"{name}.bin": digest.hexdigest() for name, digest in self._digests.items()}

    def discard(self) -> None:
        """Close and remove the temp files (a failed run; a re-run merges again from its finished shards)."""
        for name, builder in self._builders.items():
            builder.data_file.close()
            for suffix in (".bin", ".idx"):
                path = self._partial(name + suffix)
                if os.path.exists(path):
                    os.remove(path)


def file_entries(output: str, known_sha256: Dict[str, str], stats: List[dict]) -> Dict[str, dict]:
    """Size and sha256 of every published file (`known_sha256`: digests already computed while merging), and
    tokens.bin's largest token id (from the shards' stats; scanned once when a shard of an older run lacks it), so
    a reader range-checks ids against the model's vocabulary without reading the tokens."""
    entries = {}
    for name in DATA_FILES + ("rejects.jsonl",):
        path = os.path.join(output, name)
        digest = known_sha256.get(name) or file_sha256(path)
        entries[name] = {"bytes": os.path.getsize(path), "sha256": digest}
    entries["tokens.bin"]["max_id"] = max_token_id(os.path.join(output, "tokens.bin"), stats)
    return entries


def max_token_id(tokens_bin: str, stats: List[dict]) -> int:
    """The largest id in `tokens_bin` (-1 when it holds none): from the shards' stats, or by one scan of the file."""
    if all("max_token_id" in s for s in stats):
        return max([int(s["max_token_id"]) for s in stats] + [-1])
    if os.path.getsize(tokens_bin) == 0:
        return -1
    return int(np.memmap(tokens_bin, dtype=np.int32, mode="r").max())


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
