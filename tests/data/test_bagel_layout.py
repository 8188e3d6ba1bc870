"""BAGEL's clean copies (objective.captioning = bagel): the laid-out row, the synthetic generator, the attention
layout hiding the noised copy, and condition dropout over both copies. The compiled writer and the planner are
compared with the reference in test_packed_kernels.py, test_collate_packed.py and test_packing.py; the loader in
test_data_loader.py."""

import dataclasses

import numpy as np
import pytest
import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import MODALITY_IMAGE, contiguous_runs
from megafusion.data.collate import FramePart, SequenceLayout, TextPart, collate, unpatchify
from megafusion.data.collate_packed import SegmentTable, collate_packed
from megafusion.data.frame_copies import frame_copies, with_clean_copies
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.model.attention.layout import AttentionLayout
from megafusion.objectives.flow_matching import LatentIndex, apply_noise, noise_batch

A = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
F1 = np.array([[5.0, 5.0], [6.0, 6.0]], dtype=np.float32)
F2 = np.array([[7.0, 7.0], [8.0, 8.0]], dtype=np.float32)


def _t(*ids):
    return TextPart(np.array(ids, dtype=np.int64))


def bagel_row():
    """doc 0: BOS 20 BOI [A] EOI 21 EOS (positions 0-9 once A is doubled: A noised 3-4, A clean 5-6, caption 21 at
    8); doc 1: BOS BOI [F1 F2] EOI EOS, a two-frame video (positions 10-21: F1 n 12-13, c 14-15, F2 n 16-17,
    c 18-19)."""
    docs = [[_t(ST.bos, 20, ST.boi), FramePart(A), _t(ST.eoi, 21, ST.eos)],
            [_t(ST.bos, ST.boi), FramePart(F1), FramePart(F2), _t(ST.eoi, ST.eos)]]
    return collate([SequenceLayout([with_clean_copies(d) for d in docs])], seq_length=24, patch_dim=2).validate()


def test_frame_copies_follow_the_captioning_rule():
    assert frame_copies("transfusion") == 1 and frame_copies("bagel") == 2
    with pytest.raises(ValueError, match="objective.captioning='other'"):
        frame_copies("other")
    clean = FramePart(A, noised=False)
    parts = with_clean_copies([_t(ST.boi), FramePart(A), clean])
    assert [type(p).__name__ for p in parts] == ["TextPart", "FramePart", "FramePart", "FramePart"]
    assert [p.noised for p in parts[1:]] == [True, False, False]  # an already clean frame stays single
    assert parts[2].patches is parts[1].patches


def test_bagel_row_positions_blocks_and_noised_flags():
    batch = bagel_row()
    n, c = True, False
    assert batch.block_ids[0].tolist() == [-1, -1, -1, 0, 0, 1, 1, -1, -1, -1,
                                           -1, -1, 2, 2, 3, 3, 4, 4, 5, 5, -1, -1, -1, -1]
    noised = [c] * 3 + [n, n, c, c] + [c] * 5 + [n, n, c, c, n, n, c, c] + [c] * 4
    assert batch.noised[0].tolist() == noised
    assert batch.tokens[0, :3].tolist() == [ST.bos, 20, ST.boi] and batch.tokens[0, 7:10].tolist() == [ST.eoi, 21,
                                                                                                         ST.eos]
    assert (batch.tokens[0][batch.modality[0] == MODALITY_IMAGE] == ST.pad).all()
    # one latent row per latent position: each frame's patches twice, the noised copy first
    want = np.concatenate([A, A, F1, F1, F2, F2])
    assert torch.equal(batch.latents, torch.from_numpy(want))
    assert batch.context_start[0].tolist() == [0] * 10 + [10] * 12 + [22, 23]
    # the EOI after the clean copy predicts the caption; no CE target inside or across the copies
    assert batch.loss_mask[0].tolist()[:10] == [1, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    # the compiled writer lays the same row out with copies = 2
    frames = unpatchify(np.stack([A, F1, F2]), 1, 2, 2, 1)  # stored [C=2, H=2, W=1] frames whose patches these are
    table = SegmentTable.from_rows([([[ST.bos, 20, ST.boi, ST.frame, ST.eoi, 21, ST.eos],
                                      [ST.bos, ST.boi, ST.frame, ST.frame, ST.eoi, ST.eos]], [frames])])
    packed = collate_packed([table], 24, 1, 2, ST.frame, copies=2).validate()
    for name in ("tokens", "block_ids", "noised", "context_start", "loss_mask", "latents"):
        assert torch.equal(getattr(packed, name), getattr(batch, name)), name


def test_layout_hides_the_noised_copy_from_what_follows():
    batch = bagel_row()
    mask = AttentionLayout.from_batch(batch, hide_noised=True).dense_mask()[0, 0]
    seen = lambda q: torch.nonzero(mask[q]).flatten().tolist()  # noqa: E731
    assert seen(8) == [0, 1, 2, 5, 6, 7, 8]  # the caption reads the clean copy of A, never its noised copy
    assert seen(7) == [0, 1, 2, 5, 6, 7]  # so does the EOI that predicts it
    assert seen(3) == [0, 1, 2, 3, 4]  # the noised copy: its context and its own block (generated from the text)
    assert seen(5) == [0, 1, 2, 5, 6]  # the clean copy does not read the noised one
    assert seen(16) == [10, 11, 14, 15, 16, 17]  # frame 2 (noised) reads frame 1's clean copy only
    assert seen(21) == [10, 11, 14, 15, 18, 19, 20, 21]  # the video's EOS: clean copies only
    # without hide_noised_latents the caption would read the noised copy too
    visible = AttentionLayout.from_batch(batch, hide_noised=False).dense_mask()[0, 0]
    assert visible[8, 3:5].all()


def test_condition_dropout_drops_both_copies_and_clean_copies_are_not_trained():
    batch = bagel_row()
    index = LatentIndex.from_batch(batch)
    assert index.num_blocks == 6 and index.num_items == 2  # n c of A; n c n c of the video
    assert index.item_index.tolist() == [0] * 4 + [1] * 8
    out = apply_noise(batch, torch.full((6,), 0.5), torch.zeros(12, 2), torch.tensor([True, True]))
    assert out.context_start[0, 3:7].tolist() == [3] * 4 and out.context_start[0, 12:20].tolist() == [12] * 8
    assert out.context_start[0, 7:10].tolist() == [0] * 3  # text after the item keeps its context
    clean = ~index.noised
    assert clean.tolist() == [False, False, True, True] + [False, False, True, True] * 2
    assert torch.equal(out.noisy_latents[clean], batch.latents[clean])
    assert (out.latent_t[clean] == 1).all() and (out.fm_loss_mask[clean] == 0).all()
    assert (out.latent_t[~clean] == 0.5).all() and (out.fm_loss_mask[~clean] == 1).all()


@pytest.mark.parametrize("kind", ["mixed", "video"])
def test_synthetic_bagel_rows_pair_every_frame(kind):
    spec = SyntheticSpec(vocab_size=64, seq_length=160, patch_dim=4, patches_per_frame=4, kind=kind, copies=2)
    batch = SyntheticDocuments(spec, seed=3).batch(4).validate()
    latent_row, pairs = 0, 0
    for r in range(batch.batch_size):
        blocks = [(s, e, b) for s, e, b in contiguous_runs(batch.block_ids[r]) if b >= 0]
        assert len(blocks) % 2 == 0
        for (s0, e0, b0), (s1, e1, b1) in zip(blocks[::2], blocks[1::2]):
            assert s1 == e0 and e1 - s1 == e0 - s0 == 4 and b1 == b0 + 1  # the clean copy directly follows
            assert batch.noised[r, s0:e0].all() and not batch.noised[r, s1:e1].any()
            assert torch.equal(batch.latents[latent_row: latent_row + 4], batch.latents[latent_row + 4: latent_row + 8])
            latent_row += 8
            pairs += 1
    assert pairs > 4 and latent_row == batch.num_latent_positions
    # the same random stream as with one copy: the first row's documents, clean copies dropped, are the first
    # documents of the one-copy row (fewer of them fit)
    row1 = SyntheticDocuments(dataclasses.replace(spec, copies=1), seed=3).row()
    row2 = SyntheticDocuments(spec, seed=3).row()
    assert 0 < len(row2.documents) <= len(row1.documents)
    for d1, d2 in zip(row1.documents, row2.documents):
        noised = [p for p in d2 if not (isinstance(p, FramePart) and not p.noised)]
        assert len(noised) == len(d1)
        for p1, p2 in zip(d1, noised):
            x1 = p1.ids if isinstance(p1, TextPart) else p1.patches
            x2 = p2.ids if isinstance(p2, TextPart) else p2.patches
            assert np.array_equal(x1, x2)
    out = noise_batch(batch, ObjectiveConfig(captioning="bagel"), torch.Generator().manual_seed(0))
    assert int(out.fm_loss_mask.sum()) == batch.num_latent_positions // 2
