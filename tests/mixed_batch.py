"""A mixed packed batch for model tests (two rows: text, noised and clean images, a 2-frame video, padding, two
documents, a CFG-dropped context) at tiny_model.py's sizes, and the keyword arguments of the transformers model
(megafusion/hf) for it."""

from __future__ import annotations

import numpy as np
import torch

from megafusion.data.collate import FramePart, SequenceLayout, TextPart, collate
from tiny_model import PATCH_DIM, PATCHES

SEQ = 48


def mixed_batch(seed: int = 0):
    """Two rows: text, images (noised and clean), a 2-frame video, right padding, two documents in row 0, and a
    CFG-dropped context (an image whose context_start is its own first position) in row 1."""
    rng = np.random.default_rng(seed)

    def text(n):
        return TextPart(rng.integers(16, 200, n).astype(np.int64))

    def frame(noised=True):
        return FramePart(rng.standard_normal((PATCHES, PATCH_DIM)).astype(np.float32), noised=noised)

    row0 = SequenceLayout([[text(5), frame(), text(3)], [text(4), frame(), frame(), text(2)]])
    row1 = SequenceLayout([[text(6), frame(noised=False), text(2), frame(), text(3), frame(), text(2)]])
    batch = collate([row0, row1], SEQ, PATCH_DIM)
    # CFG condition dropout of row 1's second noised image (positions 16..19): it sees nothing before itself
    context_start = batch.context_start.clone()
    start = int(torch.nonzero(batch.block_ids[1] >= 0).flatten()[8])
    context_start[1, start:start + PATCHES] = start
    g = torch.Generator().manual_seed(seed)
    n = batch.num_latent_positions
    t = torch.rand(n, generator=g)
    noise = torch.randn(n, PATCH_DIM, generator=g)
    noised = batch.noised[batch.image_positions]
    z_t = t[:, None] * batch.latents + (1 - t[:, None]) * noise
    batch = batch.replace(context_start=context_start, noisy_latents=torch.where(noised[:, None], z_t, batch.latents),
                          latent_t=torch.where(noised, t, torch.ones_like(t))).validate()
    assert (batch.document_ids[0] == 1).any() and (batch.document_ids < 0).any(1).all()
    return batch


def hf_inputs(batch):
    return dict(input_ids=batch.tokens, modality=batch.modality, block_ids=batch.block_ids,
                document_ids=batch.document_ids, context_start=batch.context_start, noised=batch.noised,
                latents=batch.noisy_latents, latent_t=batch.latent_t)
