"""Packing: a stream of documents -> rows of exactly seq_length positions, and a planned row -> SequenceLayout.

Packing is split in two so the expensive half can run in loader workers:

1. `RowPlanner` (main process, metadata only) consumes document ids in stream order and emits *row plans*: an
   int64 array [n_segments, 4] of (document, token_start, token_end, first_frame). It is a greedy state machine:
     - a document's positions are its tokens with every FRAME expanded to `patches_per_frame` patch positions;
     - text is packed back to back; a text run that does not fit is cut, and its remainder continues in the
       next row as a new document segment (it cannot see its earlier part: context starts at the segment);
     - a frame (one image or one video frame) is never split: when it does not fit, the current row is closed
       (its tail becomes padding) and the frame starts the next row, taking its directly preceding BOI with it;
     - a cut that would fall exactly between a BOI and its frame moves before the BOI instead.
   The plan is a pure function of the document stream, so the same stream gives the same rows on every rank,
   in every worker and after a resume.
2. `read_row` (worker) reads the planned token ranges and the frames' memory-map views into a `PackedRow`,
   which `collate_packed` (collate.py) turns into the Batch contract, patchifying straight into the output.
   `layout_row` gives the same row as a `SequenceLayout` of TextParts and FrameParts (for `collate`; tests).

`patchify` / `unpatchify` live in collate.py and are re-exported here.
"""

from __future__ import annotations

from itertools import accumulate
from typing import List

import numpy as np

from megafusion.data.collate import (FramePart, PackedRow, Part, SequenceLayout, TextPart, _patches_from_rows,
                                     _rows_first, patchify, unpatchify)
from megafusion.data.indexed import MultimodalDataset, to_float32

SEGMENT_FIELDS = ("document", "token_start", "token_end", "first_frame")
__all__ = ["RowPlanner", "read_row", "layout_row", "patchify", "unpatchify", "SEGMENT_FIELDS"]


class RowPlanner:
    """Greedy packer over document ids of one dataset; `add(doc)` may complete rows, `rows` collects them."""

    def __init__(self, dataset: MultimodalDataset, seq_length: int, patches_per_frame: int):
        if patches_per_frame + 1 > seq_length:
            raise ValueError(
                f"one frame needs {patches_per_frame} positions plus its BOI but data.seq_length={seq_length}; "
                f"raise data.seq_length or model.patch_size"
            )
        self.dataset = dataset
        self.seq_length = seq_length
        self.ppf = patches_per_frame
        self.positions = dataset.positions(patches_per_frame)  # [D] positions of each whole document
        self.rows: List[np.ndarray] = []  # completed row plans, [n_segments, 4] int64 each
        self.fill = 0  # positions used in the open row
        self._segments: List[tuple] = []

    def _close(self) -> None:
        self.rows.append(np.array(self._segments, dtype=np.int64).reshape(-1, 4))
        self._segments = []
        self.fill = 0

    def _put(self, doc: int, start: int, end: int, first_frame: int, cost: int) -> None:
        self._segments.append((doc, start, end, first_frame))
        self.fill += cost

    def add(self, doc: int) -> None:
        """Append document `doc` to the packed stream."""
        S, ppf = self.seq_length, self.ppf
        n = int(self.dataset.token_lengths[doc])
        if self.dataset.frame_counts[doc] == 0:  # text only: fill, cut, continue
            pos = 0
            while pos < n:
                take = min(n - pos, S - self.fill)
                self._put(doc, pos, pos + take, 0, take)
                pos += take
                if self.fill == S:
                    self._close()
            return
        total = int(self.positions[doc])
        if total <= S - self.fill:  # the whole document fits: one segment, exactly what the walk below gives
            self._put(doc, 0, n, 0, total)  # (read_row checks its FRAME count against latents.idx)
            if self.fill == S:
                self._close()
            return
        frames, boi = self.dataset.frame_positions(doc)  # validates the FRAME count
        nf = len(frames)
        pos, j = 0, 0
        while pos < n:
            room = S - self.fill
            end, cost, k, full = pos, 0, j, False
            while True:
                nxt = frames[k] if k < nf else n  # the next frame token (or the document end)
                if cost + (nxt - end) >= room:  # text fills the row
                    end += room - cost
                    cost, full = room, True
                    if k < nf and end == nxt and boi[k] and end - 1 >= pos:  # do not strand the BOI
                        end, cost = end - 1, cost - 1
                    break
                cost += nxt - end
                end = nxt
                if k == nf:
                    break
                if cost + ppf > room:  # the frame does not fit: it opens the next row, with its BOI
                    if boi[k] and end - 1 >= pos:
                        end, cost = end - 1, cost - 1
                    full = True
                    break
                cost += ppf
                end += 1
                k += 1
                if cost == room:
                    full = True
                    break
            if end == pos:
                if self.fill == 0:
                    raise ValueError(f"{self.dataset.folder}: document {doc}: a frame of {ppf} patches does not fit "
                                     f"in an empty row of {S} positions")
                self._close()
                continue
            self._put(doc, pos, end, j, cost)
            pos, j = end, k
            if full:
                self._close()

    def flush(self) -> None:
        """Close the open row (its tail becomes padding); used at the end of a finite stream."""
        if self._segments:
            self._close()


def read_row(dataset: MultimodalDataset, plan: np.ndarray) -> PackedRow:
    """Read one planned row: its token stream (segments back to back) and its frames as memory-map views.

    Slices of the dataset's flat memory-map views (no per-segment read calls); the FRAME count of every segment,
    which says how many latents it takes from `first_frame` on, comes from one reduceat over the row.
    """
    segments = plan.tolist()
    tok_flat, tok_start, tok_len, frame_counts = dataset._tok_flat, dataset._tok_start, dataset.token_lengths, \
        dataset.frame_counts
    pieces, lengths = [], []
    for doc, start, end, _ in segments:
        a = int(tok_start[doc])
        pieces.append(tok_flat[a + start: a + end])
        lengths.append(end - start)
    tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    frames = []
    is_frame = tokens == dataset.frame_token
    if not is_frame.any():
        counts = [0] * len(lengths)
    elif len(lengths) > 1:
        counts = np.add.reduceat(is_frame, np.fromiter(accumulate(lengths[:-1], initial=0), np.int64,
                                                       len(lengths))).tolist()
    else:
        counts = [int(is_frame.sum())]
    lat_flat, lat_start, lat_docs = dataset._lat_flat, dataset._lat_start, dataset._latent_docs
    numel, shape = dataset._frame_numel, dataset._frame_shape
    for (doc, start, end, first), n in zip(segments, counts):
        # more FRAMEs than latents (e.g. planned as text), or a whole document (planned without walking its
        # frames) whose FRAME count differs from latents.idx: frame_positions raises DatasetFormatError naming it
        if first + n > frame_counts[doc] or (start == 0 and end == tok_len[doc] and n != frame_counts[doc]):
            dataset.frame_positions(doc)
        if n:
            a = int(lat_start[int(lat_docs[doc]) + first])
            frames.append(lat_flat[a: a + n * numel].reshape((n,) + shape))
    return PackedRow(tokens, lengths, frames, dataset.latent_dtype)


def layout_row(dataset: MultimodalDataset, plan: np.ndarray, patch_size: int) -> SequenceLayout:
    """Read one planned row: each segment becomes a document of TextParts and FrameParts (patchified)."""
    frame_token = dataset.frame_token
    tokens, frame_at, reads = [], [], []
    n_frames = 0
    for doc, start, end, first in plan.tolist():
        toks = dataset.tokens(doc, start, end)
        at = np.flatnonzero(toks == frame_token)
        tokens.append(toks)
        frame_at.append(at)
        if len(at):
            if first + len(at) > dataset.frame_counts[doc]:  # planned as text: its FRAMEs have no latents
                dataset.frame_positions(doc)  # raises DatasetFormatError naming the document
            reads.append((doc, first, len(at), n_frames))
            n_frames += len(at)
    if n_frames:
        c, h, w = dataset.latent_shape
        p = patch_size
        if h % p or w % p:
            raise ValueError(f"{dataset.folder}: latent grid {h}x{w} is not divisible by model.patch_size={p}")
        rows = np.empty((n_frames, h // p, c, p, w), dtype=dataset._lat_np_dtype)
        for doc, first, count, at in reads:  # read from the memory map straight into patchify's first layout
            np.copyto(rows[at: at + count], _rows_first(dataset.frames_raw(doc, first, count), p))
        stored = _patches_from_rows(rows, p)  # [F, ppf, patch_dim] in the stored dtype
        patches = stored if stored.dtype == np.float32 else to_float32(stored, dataset.latent_dtype)
    layout = SequenceLayout()
    f = 0
    for toks, at in zip(tokens, frame_at):
        parts: List[Part] = []
        prev = 0
        for a in at.tolist():
            if a > prev:
                parts.append(TextPart(toks[prev:a]))
            parts.append(FramePart(patches[f]))
            f += 1
            prev = a + 1
        if prev < len(toks):
            parts.append(TextPart(toks[prev:]))
        layout.documents.append(parts)
    return layout
