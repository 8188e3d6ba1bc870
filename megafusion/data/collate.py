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
    """Build a Batch of len(rows) sequences of seq_length positions (the tail of each row is padding)."""
    b = len(rows)
    tokens = np.full((b, seq_length), pad_id, dtype=np.int64)
    modality = np.full((b, seq_length), MODALITY_TEXT, dtype=np.int64)
    block_ids = np.full((b, seq_length), -1, dtype=np.int64)
    document_ids = np.full((b, seq_length), -1, dtype=np.int64)
    context_start = np.tile(np.arange(seq_length, dtype=np.int64), (b, 1))  # padding sees only itself
    noised = np.zeros((b, seq_length), dtype=bool)
    latents: List[np.ndarray] = []
    for r, row in enumerate(rows):
        if row.length() > seq_length:
            raise ValueError(f"row {r} holds {row.length()} positions, more than seq_length={seq_length}")
        pos = 0
        block = 0
        for d, doc in enumerate(row.documents):
            doc_start = pos
            for part in doc:
                n = _part_length(part)
                span = slice(pos, pos + n)
                if isinstance(part, TextPart):
                    tokens[r, span] = part.ids
                else:
                    if part.patches.ndim != 2 or part.patches.shape[1] != patch_dim:
                        raise ValueError(
                            f"row {r} document {d}: frame patches have shape {part.patches.shape}, "
                            f"expected [n_patches, {patch_dim}]"
                        )
                    modality[r, span] = MODALITY_IMAGE
                    block_ids[r, span] = block
                    noised[r, span] = part.noised
                    latents.append(np.asarray(part.patches, dtype=np.float32))
                    block += 1
                document_ids[r, span] = d
                context_start[r, span] = doc_start
                pos += n
    is_text = (modality == MODALITY_TEXT) & (document_ids >= 0)
    labels = np.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    # CE counts where this position and the next are text of the same document.
    loss_mask = np.zeros((b, seq_length), dtype=np.float32)
    loss_mask[:, :-1] = is_text[:, :-1] & is_text[:, 1:] & (document_ids[:, :-1] == document_ids[:, 1:])
    lat = torch.from_numpy(np.concatenate(latents, 0)) if latents else torch.zeros(0, patch_dim)
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
        noisy_latents=lat.clone(),
        latent_t=torch.ones(lat.shape[0]),
    )
