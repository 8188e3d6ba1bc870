"""The compiled per-position loop of the loader's hot path (packed_kernels.fill_positions, through
collate_packed) against `collate` of the same layouts, on hand-made rows with the edge cases a dataset rarely
produces: an empty row, a row filled to the last position, frames first in a segment and back to back, one-token
segments. Dataset-read rows are compared in test_collate_packed.py."""

import dataclasses

import numpy as np
import torch

from megafusion.data.batch import Batch
from megafusion.data.collate import (FramePart, PackedRow, SequenceLayout, TextPart, collate, collate_packed,
                                     patchify)
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST

C, H, W = 3, 12, 12


def _row(segments, rng):
    """PackedRow and the equivalent SequenceLayout of segments given as lists of token ids (ST.frame = a frame)."""
    tokens, frames, layout = [], [], SequenceLayout()
    for seg in segments:
        parts, text = [], []
        for tok in seg:
            if tok == ST.frame:
                if text:
                    parts.append(TextPart(np.array(text)))
                    text = []
                frame = rng.standard_normal((1, C, H, W)).astype(np.float32)
                frames.append(frame)
                parts.append(FramePart(patchify(frame, 2)[0]))
            else:
                text.append(tok)
        if text:
            parts.append(TextPart(np.array(text)))
        layout.documents.append(parts)
        tokens += seg
    return PackedRow(np.array(tokens, dtype=np.int32), [len(s) for s in segments], frames), layout


def test_collate_packed_edge_rows_equal_collate():
    rng = np.random.default_rng(0)
    ppf, f = (H // 2) * (W // 2), ST.frame
    seq_length = 2 * ppf + 7
    rows = [
        [[20, 21, f, 22], [f, 23]],  # a segment that opens with a frame
        [],  # an empty row: all padding
        [[f, f], [24], [25, 26, 27, 28, 29, 30]],  # back-to-back frames, a one-token segment; exactly full
        [[31]],
    ]
    packed, layouts = zip(*(_row(segments, rng) for segments in rows))
    assert sum(len(s) + (ppf - 1) * s.count(f) for s in rows[2]) == seq_length
    ref = collate(list(layouts), seq_length, C * 4).validate()
    got = collate_packed(list(packed), seq_length, 2, C * 4, f).validate()
    for field in dataclasses.fields(Batch):
        x, y = getattr(ref, field.name), getattr(got, field.name)
        assert (x is None) == (y is None), field.name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), field.name
