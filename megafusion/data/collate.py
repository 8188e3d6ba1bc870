"""Turn laid-out rows into the Batch contract; patchify.

Two inputs, one contract (megafusion.data.batch.Batch), identical batches for identical content:

- `collate(rows: [SequenceLayout])`: a row is an ordered list of document segments, each an ordered list of
  parts — `TextPart` (token ids) or `FramePart` (the patches of one image or one video frame, with its own
  `noised` flag). Used by the synthetic generator and tests that build layouts by hand.
- `collate_packed` (collate_packed.py): rows as planned over a dataset's memory maps (a SegmentTable), the
  loader's hot path, written by compiled loops.

Both write every field into arrays they ask `alloc(name, shape, dtype)` for (`*_fields` return them by name;
a loader worker's allocator places them in its shared-memory slot, see batch_ring.py); `batch_from_fields`
wraps such arrays as a Batch without copies. Deciding *what* goes into a row (packing, never splitting a frame) is
the packer's job; this module only writes the contract. `latents` and `noisy_latents` of a collated Batch are the
same tensor (noisy_latents = latents before noising): consumers must not write either in place — the flow-matching
objective (megafusion.objectives.flow_matching.noise_batch) returns fresh tensors for every field it fills.

`patchify` cuts [F, C, H, W] latents into p x p patches in raster order, each patch vector (C, p, p) flattened:
[F, (H/p)*(W/p), C*p*p]; `unpatchify` is its inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megafusion.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megafusion.data.special_tokens import SPECIAL_TOKENS


@dataclass
class TextPart:
    ids: np.ndarray  # [n] int token ids


@dataclass
class FramePart:
    patches: np.ndarray  # [n_patches, patch_dim] clean latent patches of one image or video frame
    noised: bool = True  # trained with flow matching (False: clean conditioning image)


Part = Union[TextPart, FramePart]


@dataclass
class SequenceLayout:
    documents: List[List[Part]] = field(default_factory=list)

    def length(self) -> int:
        return sum(_part_length(p) for doc in self.documents for p in doc)


def _part_length(part: Part) -> int:
    return len(part.ids) if isinstance(part, TextPart) else part.patches.shape[0]


Alloc = Callable[[str, Tuple[int, ...], type], np.ndarray]  # (field name, shape, dtype) -> array to fill


def new_field(name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """The default `alloc`: a fresh array (skewed, see _skewed_empty)."""
    return _skewed_empty(shape, dtype)


def collate(rows: Sequence[SequenceLayout], seq_length: int, patch_dim: int, pad_id: int = SPECIAL_TOKENS.pad) -> Batch:
    """Build a Batch of len(rows) sequences of seq_length positions (the tail of each row is padding)."""
    return batch_from_fields(collate_fields(rows, seq_length, patch_dim, pad_id))


def collate_fields(rows: Sequence[SequenceLayout], seq_length: int, patch_dim: int, pad_id: int = SPECIAL_TOKENS.pad,
                   alloc: Alloc = new_field) -> Dict[str, np.ndarray]:
    """The arrays of `collate`'s Batch by field name (noisy_latents is latents), written into `alloc`'s arrays.

    One Python pass records each part's length and place; the per-position values of the whole batch are then
    built with np.repeat of per-part values and written with one slice per row and field; latents are copied once.
    """
    b = len(rows)
    lengths: List[int] = []  # per part
    row_used: List[int] = []  # positions filled per row
    doc_ids: List[int] = []
    doc_starts: List[int] = []
    is_frame: List[bool] = []
    noised_part: List[bool] = []
    token_chunks: List[np.ndarray] = []  # per part: its ids, or PAD over its latent positions
    latents: List[np.ndarray] = []
    pad_block = np.full(seq_length, pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, doc in enumerate(row.documents):
            doc_start = pos
            for part in doc:
                frame = not isinstance(part, TextPart)
                if frame:
                    n = part.patches.shape[0]
                    if part.patches.ndim != 2 or part.patches.shape[1] != patch_dim:
                        raise ValueError(
                            f"row {r} document {d}: frame patches have shape {part.patches.shape}, "
                            f"expected [n_patches, {patch_dim}]"
                        )
                    latents.append(part.patches)
                    token_chunks.append(pad_block[:n])
                else:
                    n = len(part.ids)
                    token_chunks.append(part.ids)
                lengths.append(n)
                doc_ids.append(d)
                doc_starts.append(doc_start)
                is_frame.append(frame)
                noised_part.append(frame and part.noised)
                pos += n
        if pos > seq_length:
            raise ValueError(f"row {r} holds {pos} positions, more than seq_length={seq_length}")
        row_used.append(pos)
    shape = (b, seq_length)
    tokens = _filled(alloc, "tokens", shape, np.int64, pad_id)
    modality = _filled(alloc, "modality", shape, np.int64, MODALITY_TEXT)
    block_ids = _filled(alloc, "block_ids", shape, np.int64, -1)
    document_ids = _filled(alloc, "document_ids", shape, np.int64, -1)
    context_start = alloc("context_start", shape, np.int64)
    context_start[:] = np.arange(seq_length, dtype=np.int64)  # padding sees only itself
    noised = _filled(alloc, "noised", shape, bool, False)
    if lengths:
        # per-position values of all rows' filled prefixes, back to back
        n_part = np.asarray(lengths, dtype=np.int64)
        frame = np.asarray(is_frame, dtype=bool)
        frame_block = np.cumsum(frame) - frame  # frames before each part; made row-relative below
        values = {
            "tokens": np.concatenate(token_chunks).astype(np.int64, copy=False),
            "modality": np.repeat(np.where(frame, MODALITY_IMAGE, MODALITY_TEXT), n_part),
            "document_ids": np.repeat(np.asarray(doc_ids, dtype=np.int64), n_part),
            "context_start": np.repeat(np.asarray(doc_starts, dtype=np.int64), n_part),
            "noised": np.repeat(np.asarray(noised_part, dtype=bool), n_part),
        }
        block_vals = np.repeat(np.where(frame, frame_block, -1), n_part)
        targets = {"tokens": tokens, "modality": modality, "document_ids": document_ids,
                   "context_start": context_start, "noised": noised}
        c = 0
        for r, used in enumerate(row_used):
            for name, target in targets.items():
                target[r, :used] = values[name][c: c + used]
            row_blocks = block_vals[c: c + used]
            if used:
                image = row_blocks >= 0
                if image.any():
                    row_blocks = np.where(image, row_blocks - row_blocks[image][0], -1)
                block_ids[r, :used] = row_blocks
            c += used
    is_text = (modality == MODALITY_TEXT) & (document_ids >= 0)
    labels = alloc("labels", shape, np.int64)
    labels[:, :-1] = tokens[:, 1:]
    labels[:, -1] = pad_id
    # CE counts where this position and the next are text of the same document.
    loss_mask = alloc("loss_mask", shape, np.float32)
    loss_mask[:, :-1] = is_text[:, :-1] & is_text[:, 1:] & (document_ids[:, :-1] == document_ids[:, 1:])
    loss_mask[:, -1] = 0.0
    lat = alloc("latents", (sum(p.shape[0] for p in latents), patch_dim), np.float32)
    if latents:
        np.concatenate(latents, 0, out=lat)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "modality": modality, "block_ids": block_ids,
            "document_ids": document_ids, "context_start": context_start, "noised": noised, "latents": lat,
            "latent_t": _filled(alloc, "latent_t", (lat.shape[0],), np.float32, 1.0)}


def _filled(alloc: Alloc, name: str, shape, dtype, value) -> np.ndarray:
    out = alloc(name, shape, dtype)
    out.fill(value)
    return out


def _skewed_empty(shape, dtype, skew: int = 1024) -> np.ndarray:
    """np.empty whose start sits `skew` bytes further into its page than a fresh allocation's.

    Large fresh arrays all start at about the same offset within a 4 KiB page, and a copy between two of them
    (e.g. labels from tokens shifted by one position) then suffers 4K aliasing:
    each load looks like it depends on a just-issued store, about 10x slower than a plain memcpy.
    """
    n = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    return np.empty(n + skew // itemsize, dtype=dtype)[skew // itemsize:].reshape(shape)


def _scratch(shape, dtype) -> np.ndarray:
    """An uninitialised array in this process's scratch buffer (grown as needed, never shrunk): a large fresh
    allocation would page-fault its memory in again on every call."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if len(_SCRATCH[0]) < nbytes:
        _SCRATCH[0] = _skewed_empty((nbytes,), np.uint8)
    return _SCRATCH[0][:nbytes].view(dtype).reshape(shape)


_SCRATCH = [np.empty(0, dtype=np.uint8)]


# ---------------------------------------------------------------------------------------------- patchify
def patchify(latents: np.ndarray, p: int) -> np.ndarray:
    """[F, C, H, W] -> [F, (H/p)*(W/p), C*p*p], patches in raster order, patch vector (C, p, p) flattened."""
    f, c, h, w = latents.shape
    if h % p or w % p:
        raise ValueError(f"latent grid {h}x{w} is not divisible by model.patch_size={p}")
    return _patches_from_rows(np.ascontiguousarray(_rows_first(latents, p)), p)


def _rows_first(latents: np.ndarray, p: int) -> np.ndarray:
    """Step 1 of patchify, a view: [F, C, H, W] -> [F, H/p, C, p, W] (moves whole latent rows of W values)."""
    f, c, h, w = latents.shape
    return latents.reshape(f, c, h // p, p, w).transpose(0, 2, 1, 3, 4)


def _patches_from_rows(rows: np.ndarray, p: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Step 2 of patchify: contiguous [F, H/p, C, p, W] -> [F, (H/p)*(W/p), C*p*p] (into `out` when given).

    Each run of p adjacent values is viewed as one wide element (p=2 float32 -> one uint64), so numpy moves
    p values per element instead of one: about 5x faster than a single 6-D transpose of scalars.
    """
    f, hp, c, _, w = rows.shape
    wp = w // p
    nbytes = p * rows.itemsize
    wide = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(nbytes, np.dtype((np.void, nbytes)))
    grouped = rows.view(wide).reshape(f, hp, c, p, wp).transpose(0, 1, 4, 2, 3)  # [F, H/p, W/p, C, p] of p-runs
    if out is None:
        out = np.empty((f, hp * wp, c * p * p), dtype=rows.dtype)
    np.copyto(out.view(wide).reshape(f, hp, wp, c, p), grouped)
    return out


def unpatchify(patches: np.ndarray, p: int, channels: int, height: int, width: int) -> np.ndarray:
    """Inverse of patchify: [F, (H/p)*(W/p), C*p*p] -> [F, C, H, W]."""
    f = patches.shape[0]
    x = patches.reshape(f, height // p, width // p, channels, p, p).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x).reshape(f, channels, height, width)


def batch_from_fields(fields: Dict[str, np.ndarray]) -> Batch:
    """Wrap the arrays of a clean (not yet noised) micro-batch as a Batch, without copies; noisy_latents is the
    latents tensor itself (see the module docstring)."""
    tensors = {name: torch.from_numpy(value) for name, value in fields.items()}
    return Batch(noisy_latents=tensors["latents"], **tensors)
