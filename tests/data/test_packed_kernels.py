"""The compiled per-position loop of the loader's hot path (packed_kernels.fill_positions, through
collate_packed) against `collate` of the same layouts, on hand-made rows with the edge cases a dataset rarely
produces: an empty row, a row filled to the last position, frames first in a segment and back to back, one-token
segments; each also with BAGEL's clean copies (copies = 2: every frame written as a noised and a clean copy).
Dataset-read rows are compared in test_collate_packed.py."""

import dataclasses

import numpy as np
import pytest
import torch

from megafusion.data.batch import Batch
from megafusion.data.collate import FramePart, SequenceLayout, TextPart, collate, patchify
from megafusion.data.collate_packed import SegmentTable, collate_packed
from megafusion.data.frame_copies import with_clean_copies
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST

C, H, W = 3, 12, 12


def _row(segments, rng, p=2, copies=1):
    """(segments, frames) for SegmentTable.from_rows and the equivalent SequenceLayout of segments given as lists
    of token ids (ST.frame = a frame), each frame laid out `copies` times."""
    frames, layout = [], SequenceLayout()
    for seg in segments:
        parts, text = [], []
        for tok in seg:
            if tok == ST.frame:
                if text:
                    parts.append(TextPart(np.array(text)))
                    text = []
                frame = rng.standard_normal((1, C, H, W)).astype(np.float32)
                frames.append(frame)
                parts.append(FramePart(patchify(frame, p)[0]))
            else:
                text.append(tok)
        if text:
            parts.append(TextPart(np.array(text)))
        layout.documents.append(with_clean_copies(parts) if copies == 2 else parts)
    return (segments, frames), layout


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("p", [1, 2, 3, 4])  # units of float32 moved per copy: 4, 8, 4 and 8 bytes (k = 1, 1, 3, 2)
def test_collate_packed_edge_rows_equal_collate(p, copies):
    rng = np.random.default_rng(0)
    ppf, f = (H // p) * (W // p) * copies, ST.frame  # positions of a frame, all its copies
    seq_length = 2 * ppf + 7
    rows = [
        [[20, 21, f, 22], [f, 23]],  # a segment that opens with a frame
        [],  # an empty row: all padding
        [[f, f], [24], [25, 26, 27, 28, 29, 30]],  # back-to-back frames, a one-token segment; exactly full
        [[31]],
    ]
    packed, layouts = zip(*(_row(segments, rng, p, copies) for segments in rows))
    assert sum(len(s) + (ppf - 1) * s.count(f) for s in rows[2]) == seq_length
    ref = collate(list(layouts), seq_length, C * p * p).validate()
    clean = ~ref.noised & (ref.block_ids >= 0)
    assert int(clean.sum()) == (copies - 1) * 4 * (H // p) * (W // p)  # copies = 2: a clean copy of all 4 frames
    # all rows in one table, and one table per row (each table's rows and frames continue the previous one's)
    for tables in ([SegmentTable.from_rows(packed)], [SegmentTable.from_rows([row]) for row in packed]):
        got = collate_packed(tables, seq_length, p, C * p * p, f, copies=copies).validate()
        for field in dataclasses.fields(Batch):
            x, y = getattr(ref, field.name), getattr(got, field.name)
            assert (x is None) == (y is None), field.name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), field.name


def test_collate_packed_refuses_bad_tables():
    rng = np.random.default_rng(1)
    (segments, frames), _ = _row([[20, ST.frame, 21]], rng)
    with pytest.raises(ValueError, match="row 0 holds 1 FRAME tokens but 2 frames"):
        SegmentTable.from_rows([(segments, frames * 2)])
    table = SegmentTable.from_rows([(segments, frames)])
    with pytest.raises(ValueError, match="row 0 holds 38 positions, more than seq_length=20"):
        collate_packed([table], 20, 2, C * 4, ST.frame)
    short = dataclasses.replace(table, frames_available=np.array([0]))
    with pytest.raises(ValueError, match="segment 0: its FRAME tokens disagree with its 0 stored frames"):
        collate_packed([short], 64, 2, C * 4, ST.frame)
    exact = dataclasses.replace(table, frames_available=np.array([2]), exact=np.array([True]),
                                latents=np.concatenate([table.latents] * 2))
    with pytest.raises(ValueError, match="disagree with its 2 stored frames"):
        collate_packed([exact], 64, 2, C * 4, ST.frame)
    past = dataclasses.replace(table, latent_start=np.array([5]))
    with pytest.raises(ValueError, match="reach past the 432 stored values"):
        collate_packed([past], 64, 2, C * 4, ST.frame)
    with pytest.raises(ValueError, match="patches of 12 values with model.patch_size=2, but patch_dim=16"):
        collate_packed([table], 64, 2, 16, ST.frame)
    empty = dataclasses.replace(table, length=np.array([0]))
    with pytest.raises(ValueError, match="segment 0 is empty"):
        collate_packed([empty], 64, 2, C * 4, ST.frame)
    outside = dataclasses.replace(table, token_start=np.array([1]))
    with pytest.raises(ValueError, match="segment 0's tokens reach outside the 3 stored tokens"):
        collate_packed([outside], 64, 2, C * 4, ST.frame)
    miscounted = dataclasses.replace(table, row_segments=np.array([2]))
    with pytest.raises(ValueError, match="rows hold 2 segments but 1 are given"):
        collate_packed([miscounted], 64, 2, C * 4, ST.frame)
    with pytest.raises(ValueError, match="frames_available has 2 entries for 1 segments"):
        collate_packed([dataclasses.replace(table, frames_available=np.array([1, 1]))], 64, 2, C * 4, ST.frame)

