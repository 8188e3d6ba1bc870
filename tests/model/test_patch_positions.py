"""model.patch_position_embedding=sincos2d: DiT's fixed 2D embedding of a patch's row and column in its image."""

from __future__ import annotations

import pytest
import torch

from distributed import megatron_single_process
from megafusion.data.batch import MODALITY_IMAGE
from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.embeddings import patch_index_in_block, sincos_2d


def test_sincos_2d_separates_rows_and_columns():
    grid, dim = 4, 16
    table = sincos_2d(dim, grid).view(grid, grid, dim)
    rows, cols = table[..., : dim // 2], table[..., dim // 2:]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the first half depends on the row only
    assert torch.equal(cols, cols[:1].expand_as(cols))  # the second half on the column only
    flat = table.view(grid * grid, dim)
    assert torch.cdist(flat, flat).add(torch.eye(grid * grid)).min() > 0.1  # every patch distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2)


def test_patch_index_in_block_counts_within_each_block():
    # row 0: text, block 0 (3 patches), text, block 1 (3); row 1: block 0 (3) directly followed by block 1 (3)
    block = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 1], [0, 0, 0, 1, 1, 1, -1, -1]])
    modality = (block >= 0).long() * MODALITY_IMAGE
    zeros = torch.zeros_like(block)
    layout = AttentionLayout(block_ids=block, context_start=zeros, valid=torch.ones_like(block, dtype=torch.bool),
                             noised=block >= 0, modality=modality)
    assert patch_index_in_block(layout).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_the_embedding_moves_patches_and_is_checked(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "inference"))
    from tiny_model import PATCH_DIM, PATCHES, tiny_model

    from megafusion.inference.runners import Segment, build_batch

    with megatron_single_process():
        plain = tiny_model(seed=0)
        placed = tiny_model(seed=0, patch_position_embedding="sincos2d")
        assert placed.state_dict().keys() == plain.state_dict().keys()  # no parameter, nothing saved
        x = torch.zeros(PATCHES, PATCH_DIM)
        batch, _ = build_batch([[Segment(tokens=[1, 20]), Segment(latents=x, t=0.5)]], PATCH_DIM, "cpu")
        text, _ = build_batch([[Segment(tokens=[1, 20, 21])]], PATCH_DIM, "cpu")
        with torch.no_grad():
            assert (placed(batch).velocity - plain(batch).velocity).abs().max() > 1e-3
            torch.testing.assert_close(placed(text).logits, plain(text).logits)  # text is untouched
        too_long, _ = build_batch([[Segment(latents=torch.zeros(PATCHES + 1, PATCH_DIM), t=0.5)]], PATCH_DIM, "cpu")
        with pytest.raises(ValueError, match="blocks must be single frames"):
            placed(too_long)
