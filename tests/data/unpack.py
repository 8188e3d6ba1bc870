"""Undo packing for tests: Batch -> per-row document segments (token stream with FRAME restored, frames).

With copies = 2 (objective.captioning = bagel) each frame is a noised block followed by its clean copy: the pair
gives one FRAME, and the clean copy is checked to be the noised block's patches, not noised."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from megafusion.data.batch import MODALITY_IMAGE, Batch, contiguous_runs
from megafusion.data.packing import unpatchify
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST

Segment = Tuple[List[int], List[np.ndarray]]  # tokens with one FRAME per block, frames [C, H, W]


def segments(batch: Batch, p: int, latent_shape, copies: int = 1) -> List[List[Segment]]:
    c, h, w = latent_shape
    rows = []
    latent_row = 0
    for r in range(batch.batch_size):
        out: List[Segment] = []
        docs = batch.document_ids[r]
        for start, end, d in contiguous_runs(docs):
            if d < 0:
                continue
            toks, frames = [], []
            i = start
            while i < end:
                if batch.modality[r, i] == MODALITY_IMAGE:
                    block = batch.block_ids[r, i]
                    j = i
                    while j < end and batch.block_ids[r, j] == block:
                        j += 1
                    patches = batch.latents[latent_row: latent_row + (j - i)].numpy()
                    latent_row += j - i
                    if copies == 2:  # the clean copy: the next block, same length and patches, not noised
                        assert bool(batch.noised[r, i]), (r, i)
                        k = j + (j - i)
                        assert k <= end and (batch.block_ids[r, j:k] == block + 1).all(), (r, i)
                        assert not batch.noised[r, j:k].any()
                        assert np.array_equal(batch.latents[latent_row: latent_row + (j - i)].numpy(), patches)
                        latent_row += j - i
                        j = k
                    frames.append(unpatchify(patches[None], p, c, h, w)[0])
                    toks.append(ST.frame)
                    i = j
                else:
                    toks.append(int(batch.tokens[r, i]))
                    i += 1
            out.append((toks, frames))
        rows.append(out)
    assert latent_row == batch.num_latent_positions
    return rows


def stitch(rows: List[List[Segment]]) -> Tuple[List[int], List[np.ndarray]]:
    """Concatenate every segment of every row in order: the packed stream's tokens and frames."""
    tokens, frames = [], []
    for row in rows:
        for toks, fr in row:
            tokens += toks
            frames += fr
    return tokens, frames
