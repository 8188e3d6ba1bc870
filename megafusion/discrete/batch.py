"""Discrete rows -> Batch: the masked-diffusion family's side of the Batch contract (megafusion/data/batch.py).

A row is a list of documents (unified-vocabulary id arrays, megafusion.discrete.vocab) laid end to end and
right-padded to seq_length. Text-only documents are packed several to a row; a document with image or audio codes
gets a row of its own (the loader decides; this module only lays rows out). Each document is one bidirectional
block: block_ids = document_ids = its index in the row at every position, context_start = its first position, so
every attention backend of the model (dense, segmented, flex, te) runs it unchanged, documents never see each
other and padding sees only itself.

The batch is clean: tokens = labels = the document ids, loss_mask = 0. The masked-diffusion objective
(megafusion.objectives.masked_diffusion.mask_batch) draws t and the mask and fills tokens and loss_mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megafusion.data.batch import MODALITY_TEXT, Batch
from megafusion.discrete.vocab import TEXT, UnifiedVocab

Row = Sequence[np.ndarray]


def discrete_batch(rows: Sequence[Row], seq_length: int, vocab: UnifiedVocab, patch_dim: int = 1) -> Batch:
    """Lay out `rows` (each a list of documents' id arrays) as a clean Batch of len(rows) x seq_length."""
    b = len(rows)
    tokens = np.full((b, seq_length), vocab.pad(TEXT), dtype=np.int64)
    document_ids = np.full((b, seq_length), -1, dtype=np.int64)
    context_start = np.tile(np.arange(seq_length, dtype=np.int64), (b, 1))
    for r, docs in enumerate(rows):
        pos = 0
        for d, ids in enumerate(docs):
            ids = np.asarray(ids, dtype=np.int64)
            n = len(ids)
            if n == 0:
                raise ValueError(f"discrete row {r}: document {d} is empty")
            if pos + n > seq_length:
                raise ValueError(f"discrete row {r}: documents need {pos + n} positions, more than "
                                 f"data.seq_length={seq_length}")
            if ids.min() < 0 or ids.max() >= vocab.size:
                raise ValueError(f"discrete row {r}, document {d}: ids must lie in [0, {vocab.size}) (the unified "
                                 f"vocabulary), got [{ids.min()}, {ids.max()}]")
            tokens[r, pos:pos + n] = ids
            document_ids[r, pos:pos + n] = d
            context_start[r, pos:pos + n] = pos
            pos += n
    valid = document_ids >= 0
    token_modality = np.where(valid, vocab.modality_of(tokens), -1)
    t = torch.from_numpy
    return Batch(
        tokens=t(tokens), labels=t(tokens.copy()), loss_mask=torch.zeros(b, seq_length),
        modality=torch.full((b, seq_length), MODALITY_TEXT, dtype=torch.long),
        block_ids=t(document_ids.copy()), document_ids=t(document_ids), context_start=t(context_start),
        noised=torch.zeros(b, seq_length, dtype=torch.bool), latents=torch.zeros(0, patch_dim),
        noisy_latents=torch.zeros(0, patch_dim), latent_t=torch.zeros(0), token_modality=t(token_modality),
    )


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Stack discrete batches along the row dimension (anti-masking's two copies of one micro-batch)."""
    first = batches[0]
    out = {}
    for name in ("tokens", "labels", "loss_mask", "modality", "block_ids", "document_ids", "context_start",
                 "noised", "token_modality"):
        out[name] = torch.cat([getattr(x, name) for x in batches], dim=0)
    return first.replace(**out)
