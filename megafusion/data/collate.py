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

    One Python pass records each part's length and place; every per-position field is then written with a few
    vectorised numpy calls over the whole batch (np.repeat of per-part values), and the latents are copied once.
    """
    b = len(rows)
    lengths: List[int] = []  # per part
    starts: List[int] = []  # flat start index (row * seq_length + position in the row)
    row_ids: List[int] = []
    doc_ids: List[int] = []
    doc_starts: List[int] = []
    is_frame: List[bool] = []
    noised_part: List[bool] = []
    text: List[np.ndarray] = []
    latents: List[np.ndarray] = []
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
                else:
                    n = len(part.ids)
                    text.append(part.ids)
                lengths.append(n)
                starts.append(r * seq_length + pos)
                row_ids.append(r)
                doc_ids.append(d)
                doc_starts.append(doc_start)
                is_frame.append(frame)
                noised_part.append(frame and part.noised)
                pos += n
        if pos > seq_length:
            raise ValueError(f"row {r} holds {pos} positions, more than seq_length={seq_length}")
    tokens = np.full(b * seq_length, pad_id, dtype=np.int64)
    modality = np.full(b * seq_length, MODALITY_TEXT, dtype=np.int64)
    block_ids = np.full(b * seq_length, -1, dtype=np.int64)
    document_ids = np.full(b * seq_length, -1, dtype=np.int64)
    context_start = np.tile(np.arange(seq_length, dtype=np.int64), b)  # padding sees only itself
    noised = np.zeros(b * seq_length, dtype=bool)
    if lengths:
        n_part = np.asarray(lengths, dtype=np.int64)
        first = np.asarray(starts, dtype=np.int64)
        frame = np.asarray(is_frame, dtype=bool)
        # flat index of every filled position, part by part
        offsets = np.cumsum(n_part) - n_part
        where = np.arange(int(n_part.sum()), dtype=np.int64) + np.repeat(first - offsets, n_part)
        row_of_part = np.asarray(row_ids, dtype=np.int64)
        # block ids count frames from 0 within each row
        frames_before = np.cumsum(frame) - frame
        row_first_part = np.minimum(np.searchsorted(row_of_part, np.arange(b)), len(frame) - 1)
        block = np.where(frame, frames_before - frames_before[row_first_part][row_of_part], -1)
        modality[where] = np.repeat(np.where(frame, MODALITY_IMAGE, MODALITY_TEXT), n_part)
        block_ids[where] = np.repeat(block, n_part)
        document_ids[where] = np.repeat(np.asarray(doc_ids, dtype=np.int64), n_part)
        context_start[where] = np.repeat(np.asarray(doc_starts, dtype=np.int64), n_part)
        noised[where] = np.repeat(np.asarray(noised_part, dtype=bool), n_part)
        if text:
            text_where = where[np.repeat(~frame, n_part)]
            tokens[text_where] = np.concatenate(text)
    shape = (b, seq_length)
    tokens, modality, block_ids = tokens.reshape(shape), modality.reshape(shape), block_ids.reshape(shape)
    document_ids, context_start, noised = document_ids.reshape(shape), context_start.reshape(shape), noised.reshape(shape)
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
        latent_t=torch.ones(lat.shape[0]),
    )
