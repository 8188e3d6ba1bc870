"""Turn laid-out sequences into the Batch contract.

A `SequenceLayout` is one packed row, already cut to fit: an ordered list of document segments, each an ordered
list of parts — `TextPart` (token ids) or `FramePart` (the patches of one image or one video frame). `collate`
builds the per-position metadata of megafusion.data.batch.Batch from a list of such rows and pads each to
seq_length. Deciding *what* goes into a row (packing, never splitting a frame) is the packer's job; this module
only writes the contract, so the packer, the synthetic generator and the sampler produce identical batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Union

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


def collate(rows: Sequence[SequenceLayout], seq_length: int, patch_dim: int, pad_id: int = SPECIAL_TOKENS.pad) -> Batch:
    """Build a Batch of len(rows) sequences of seq_length positions (the tail of each row is padding).

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
    tokens = np.full(shape, pad_id, dtype=np.int64)
    modality = np.full(shape, MODALITY_TEXT, dtype=np.int64)
    block_ids = np.full(shape, -1, dtype=np.int64)
    document_ids = np.full(shape, -1, dtype=np.int64)
    context_start = np.tile(np.arange(seq_length, dtype=np.int64), (b, 1))  # padding sees only itself
    noised = np.zeros(shape, dtype=bool)
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
    labels = np.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    # CE counts where this position and the next are text of the same document.
    loss_mask = np.zeros((b, seq_length), dtype=np.float32)
    loss_mask[:, :-1] = is_text[:, :-1] & is_text[:, 1:] & (document_ids[:, :-1] == document_ids[:, 1:])
    if latents:
        lat_np = np.concatenate(latents, 0, dtype=np.float32) if len(latents) > 1 else latents[0].astype(np.float32)
    else:
        lat_np = np.zeros((0, patch_dim), dtype=np.float32)
    lat = torch.from_numpy(lat_np)
    return Batch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        modality=torch.from_numpy(modality),
        block_ids=torch.from_numpy(block_ids),
        document_ids=torch.from_numpy(document_ids),
        context_start=torch.from_numpy(context_start),
        noised=torch.from_numpy(noised),
        latents=lat,
        noisy_latents=torch.from_numpy(lat_np.copy()),  # numpy memcpy: torch's threaded clone stalls on busy hosts
        latent_t=torch.from_numpy(np.ones(lat.shape[0], dtype=np.float32)),
    )
