"""Attention layouts for tests and benchmarks: random ones from the synthetic documents, crafted ones from a
short text spec, and the two transforms collate does not do (CFG-dropped context, clean conditioning frames).

Spec of one row: documents separated by "|", parts separated by spaces: "tN" N text tokens, "iN" one noised
image / frame of N patches, "cN" one clean frame of N patches; adjacent frames form one media item (a video).
Example: "t4 i8 t2 | t3 i4 i4 t1" packs two documents, the second with a two-frame video.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from megafusion.data.batch import Batch
from megafusion.data.collate import FramePart, SequenceLayout, TextPart, collate
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.model.attention.layout import AttentionLayout

PATCH_DIM = 4


def parse_row(spec: str) -> SequenceLayout:
    row = SequenceLayout()
    for doc_spec in spec.split("|"):
        doc = []
        for token in doc_spec.split():
            kind, n = token[0], int(token[1:])
            if kind == "t":
                doc.append(TextPart(np.arange(16, 16 + n, dtype=np.int64)))
            elif kind in "ic":
                doc.append(FramePart(np.zeros((n, PATCH_DIM), dtype=np.float32), noised=kind == "i"))
            else:
                raise ValueError(f"layout spec part {token!r}: use tN, iN or cN")
        row.documents.append(doc)
    return row


def crafted_batch(specs: Sequence[str], seq_length: int) -> Batch:
    return collate([parse_row(s) for s in specs], seq_length, PATCH_DIM)


def crafted_layout(specs: Sequence[str], seq_length: int, hide_noised: bool = False) -> AttentionLayout:
    return AttentionLayout.from_batch(crafted_batch(specs, seq_length), hide_noised=hide_noised)


def media_items(batch: Batch, row: int) -> List[tuple]:
    """[start, end) of each media item of a row: a maximal run of latent positions (an image or a whole video)."""
    image = batch.image_positions[row].tolist() + [False]
    items, start = [], None
    for pos, is_image in enumerate(image):
        if is_image and start is None:
            start = pos
        elif not is_image and start is not None:
            items.append((start, pos))
            start = None
    return items


def drop_context(batch: Batch, items_per_row: Sequence[Sequence[int]]) -> Batch:
    """CFG condition dropout as batch.py describes it: the chosen media items (indices into media_items) see
    nothing before their first latent position."""
    context_start = batch.context_start.clone()
    for row, chosen in enumerate(items_per_row):
        items = media_items(batch, row)
        for i in chosen:
            start, end = items[i]
            context_start[row, start:end] = start
    return batch.replace(context_start=context_start)


def random_batch(
    kind: str,
    seed: int,
    batch_size: int = 1,
    seq_length: int = 128,
    patches_per_frame: int = 8,
    fill: float = 1.0,
    cfg_drop: float = 0.0,
    clean_frames: float = 0.0,
) -> Batch:
    """A synthetic batch of `kind` (megafusion.data.synthetic.LAYOUT_KINDS), each row drawn independently;
    `cfg_drop` drops the context of that fraction of media items, `clean_frames` marks that fraction of frames
    clean (not noised) so hide_noised has both kinds to tell apart."""
    spec = SyntheticSpec(vocab_size=64, seq_length=seq_length, patch_dim=PATCH_DIM,
                         patches_per_frame=patches_per_frame, kind=kind, fill=fill)
    batch = SyntheticDocuments(spec, seed=seed).batch(batch_size)
    rng = np.random.default_rng(seed + 1000)
    if clean_frames > 0:
        noised = batch.noised.clone()
        for row in range(batch_size):
            for block in torch.unique(batch.block_ids[row][batch.block_ids[row] >= 0]).tolist():
                if rng.random() < clean_frames:
                    noised[row][batch.block_ids[row] == block] = False
        batch = batch.replace(noised=noised)
    if cfg_drop > 0:
        chosen = [[i for i in range(len(media_items(batch, r))) if rng.random() < cfg_drop] for r in range(batch_size)]
        batch = drop_context(batch, chosen)
    return batch.validate()
