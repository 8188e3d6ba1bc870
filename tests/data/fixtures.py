"""Write small dataset folders in the docs/DATA_FORMAT.md layout with megatron's IndexedDatasetBuilder.

`write_dataset(folder, docs, latent_shape, storage)` takes documents as (token list, latents [n, C, H, W]) pairs;
`random_docs(rng, ...)` makes a mix of text-only, image, interleaved and video documents whose FRAME counts match
their latents. Tests use these instead of the preprocessing tool so the reader is tested against the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megafusion.data.special_tokens import SPECIAL_TOKENS as ST

Doc = Tuple[List[int], np.ndarray]


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_dataset(folder: str, docs: Sequence[Doc], latent_shape=(4, 8, 8), storage: str = "float32") -> str:
    os.makedirs(folder, exist_ok=True)
    tok = IndexedDatasetBuilder(os.path.join(folder, "tokens.bin"), dtype=np.int32)
    lat_dtype = np.float32 if storage == "float32" else np.uint16
    lat = IndexedDatasetBuilder(os.path.join(folder, "latents.bin"), dtype=lat_dtype)
    n_frames = n_tokens = 0
    for tokens, latents in docs:
        tok.add_item(torch.tensor(np.asarray(tokens, dtype=np.int32)))
        tok.end_document()
        for frame in latents:
            flat = np.ascontiguousarray(frame, dtype=np.float32).reshape(-1)
            if storage == "bfloat16-as-uint16":
                flat = torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            elif storage in ("float16", "float16-as-uint16"):
                flat = flat.astype(np.float16).view(np.uint16)
            lat.add_item(torch.from_numpy(flat.astype(lat_dtype)))
        lat.end_document()
        n_frames += len(latents)
        n_tokens += len(tokens)
    tok.finalize(os.path.join(folder, "tokens.idx"))
    lat.finalize(os.path.join(folder, "latents.idx"))
    files = {}
    for name in ("tokens.bin", "tokens.idx", "latents.bin", "latents.idx"):
        path = os.path.join(folder, name)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha(path)}
    dtype = {"float32": "float32", "float16": "float16", "float16-as-uint16": "float16",
             "bfloat16-as-uint16": "bfloat16"}[storage]
    manifest = {
        "format_version": 1,
        "encoder": {"name": "pixel", "config": {}},
        "latent_shape": list(latent_shape),
        "latent_dtype": dtype,
        "latent_storage": storage,
        "patch_size": 2,
        "tokenizer": {"path": None, "sha256": None, "special_tokens": {}},
        "counts": {"documents": len(docs), "tokens": n_tokens, "images": n_frames, "frames": n_frames,
                   "records_read": len(docs), "rejected": 0},
        "rejected_by_reason": {},
        "files": files,
        "command": "tests/data/fixtures.py",
    }
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return folder


def rewrite_manifest(folder: str, edit) -> None:
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)


def refresh_file_entry(folder: str, name: str) -> None:
    """Record a (deliberately damaged) file's current size and hash, so only the deeper checks can catch it."""
    path = os.path.join(folder, name)

    def edit(m):
        m["files"][name] = {"bytes": os.path.getsize(path), "sha256": _sha(path)}

    rewrite_manifest(folder, edit)


def random_docs(rng: np.random.Generator, n: int, latent_shape=(4, 8, 8), vocab: int = 200,
                max_text: int = 40) -> List[Doc]:
    """A mix of text-only, image, interleaved and video documents with random contents."""
    docs: List[Doc] = []

    def text(k):
        return list(rng.integers(ST.num_reserved, vocab, size=k))

    for _ in range(n):
        kind = rng.integers(0, 4)
        toks = [ST.bos] + text(int(rng.integers(1, max_text)))
        frames = 0
        if kind == 1:  # image
            toks += [ST.boi, ST.frame, ST.eoi]
            frames = 1
        elif kind == 2:  # interleaved
            for _ in range(int(rng.integers(1, 3))):
                toks += [ST.boi, ST.frame, ST.eoi] + text(int(rng.integers(1, 12)))
                frames += 1
        elif kind == 3:  # video
            k = int(rng.integers(2, 4))
            toks += [ST.boi] + [ST.frame] * k + [ST.eoi] + text(int(rng.integers(0, 6)))
            frames = k
        toks.append(ST.eos)
        latents = rng.standard_normal((frames,) + tuple(latent_shape)).astype(np.float32)
        docs.append((toks, latents))
    return docs
