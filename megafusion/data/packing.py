"""Packing: a stream of documents -> rows of exactly seq_length positions, and a planned row -> SequenceLayout.

Packing is split in two so the expensive half can run in loader workers:

1. `RowPlanner` (main process, metadata only) consumes document ids in stream order and emits *row plans*: an
   int64 array [n_segments, 4] of (document, token_start, token_end, first_frame). It is a greedy state machine:
     - a document's positions are its tokens with every FRAME expanded to `patches_per_frame` patch positions,
       once per copy (`copies` = 2 with objective.captioning = bagel: a noised and a clean copy, frame_copies.py);
     - text is packed back to back; a text run that does not fit is cut, and its remainder continues in the
       next row as a new document segment (it cannot see its earlier part: context starts at the segment);
     - a frame (one image or one video frame) is never split: when it does not fit, the current row is closed
       (its tail becomes padding) and the frame starts the next row, taking its directly preceding BOI with it;
     - a cut that would fall exactly between a BOI and its frame moves before the BOI instead.
   The plan is a pure function of the document stream, so the same stream gives the same rows on every rank,
   in every worker and after a resume. `add` is the rules in Python, one document at a time (the reference);
   `add_from` runs them compiled over many documents (plan_kernel.py), which is what the loader uses.
2. `read_rows` (worker) turns the plans of a micro-batch's rows into a `SegmentTable` (where each segment's
   tokens and frames lie in the dataset's memory maps), which `collate_packed` (collate_packed.py) turns into the
   Batch contract, reading tokens and patchifying frames straight from the maps into the output.
   `layout_row` gives the same row as a `SequenceLayout` of TextParts and FrameParts (for `collate`; tests).
   Both expand each frame to `copies` copies the same way the planner counted them.

`patchify` / `unpatchify` live in collate.py and are re-exported here.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from megafusion.data.collate import (FramePart, Part, SequenceLayout, TextPart, _patches_from_rows, _rows_first,
                                     patchify, unpatchify)
from megafusion.data.collate_packed import SegmentTable
from megafusion.data.frame_copies import check_copies, with_clean_copies
from megafusion.data.indexed import MultimodalDataset, to_float32

SEGMENT_FIELDS = ("document", "token_start", "token_end", "first_frame")
__all__ = ["RowPlanner", "read_rows", "layout_row", "patchify", "unpatchify", "SEGMENT_FIELDS"]


class RowPlanner:
    """Greedy packer over document ids of one dataset; `add(doc)` may complete rows, `rows` collects them.

    A frame costs `copies` x `patches_per_frame` positions (`copies` = 2: BAGEL's noised + clean copy)."""

    def __init__(self, dataset: MultimodalDataset, seq_length: int, patches_per_frame: int, copies: int = 1):
        self.copies = check_copies(copies)
        self.ppf = patches_per_frame
        self.frame_cost = patches_per_frame * copies  # positions one frame takes, all its copies
        if self.frame_cost + 1 > seq_length:
            copied = f" ({copies} copies of {patches_per_frame} patches)" if copies > 1 else ""
            raise ValueError(
                f"one frame needs {self.frame_cost} positions{copied} plus its BOI but data.seq_length={seq_length}; "
                f"raise data.seq_length or model.patch_size"
            )
        self.dataset = dataset
        self.seq_length = seq_length
        self.positions = dataset.positions(self.frame_cost)  # [D] positions of each whole document
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
        S, ppf = self.seq_length, self.frame_cost
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
            self._put(doc, 0, n, 0, total)  # (collate_packed checks its FRAME count against latents.idx)
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
                    raise ValueError(f"{self.dataset.folder}: document {doc}: a frame of {ppf} positions does not "
                                     f"fit in an empty row of {S} positions")
                self._close()
                continue
            self._put(doc, pos, end, j, cost)
            pos, j = end, k
            if full:
                self._close()

    def add_from(self, order: np.ndarray, start: int, need_rows: int, snap_rows: int) -> Tuple[int, List[dict]]:
        """`add` order[start], order[start + 1], ... (compiled: plan_kernel.plan_documents) until `need_rows` more
        rows are complete or the order ends. Returns (the next order index, the snapshots taken at document
        boundaries whenever the completed-row count had changed since the last one, which counted `snap_rows`
        rows: {"rows": rows completed, "next_doc": order index, "fill", "open": segments of the open row}).
        """
        from megafusion.data.plan_kernel import plan_documents  # numba: the loader's path only

        ds, snaps_out = self.dataset, []
        order = np.ascontiguousarray(order, dtype=np.int64)
        capacity = 64 + 16 * need_rows
        while need_rows > 0 and start < len(order):
            n_open = len(self._segments)
            segs = np.empty((n_open + capacity, 4), dtype=np.int64)
            segs[:n_open] = np.array(self._segments, dtype=np.int64).reshape(-1, 4)
            row_ends = np.empty(capacity, dtype=np.int64)
            snaps = np.empty((capacity, 5), dtype=np.int64)
            rows_before = len(self.rows)
            nxt, fill, n_segs, n_rows, n_snaps, bad = plan_documents(
                order, start, need_rows, self.seq_length, self.frame_cost, ds.token_lengths, ds.frame_counts,
                self.positions, ds._tok_flat, ds._tok_start, ds.frame_token, ds.boi_token, self.fill, segs, n_open,
                row_ends, snaps, snap_rows - rows_before)
            for rows, index, snap_fill, a, b in snaps[:n_snaps].tolist():
                snaps_out.append({"rows": rows_before + rows, "next_doc": index, "fill": snap_fill,
                                  "open": segs[a:b].tolist()})
                snap_rows = rows_before + rows
            ends = row_ends[:n_rows].tolist()
            for a, b in zip([0] + ends[:-1], ends):
                self.rows.append(segs[a:b].copy())
            self._segments = [tuple(seg) for seg in segs[ends[-1] if ends else 0: n_segs].tolist()]
            self.fill = int(fill)
            if bad == -2:
                raise ValueError(f"{ds.folder}: document {int(order[nxt])}: a frame of {self.frame_cost} positions "
                                 f"does not fit in an empty row of {self.seq_length} positions")
            if bad >= 0:
                ds.frame_positions(int(bad))  # raises DatasetFormatError naming the document
                raise ValueError(f"{ds.folder}: document {int(bad)}: its FRAME tokens disagree with latents.idx")
            if nxt == start and n_rows == 0:
                capacity *= 2  # the next document might not fit in the buffers
            start, need_rows = nxt, need_rows - n_rows
        return start, snaps_out

    def flush(self) -> None:
        """Close the open row (its tail becomes padding); used at the end of a finite stream."""
        if self._segments:
            self._close()


def read_rows(dataset: MultimodalDataset, plans: Sequence[np.ndarray]) -> SegmentTable:
    """The planned rows of `dataset` as a SegmentTable over its token and latent memory maps (nothing is read
    yet): a few vectorized lookups over all their segments, whatever their number."""
    seg = plans[0] if len(plans) == 1 else np.concatenate(plans)
    doc, start, end, first = seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3]
    available = dataset.frame_counts[doc] - first
    if len(dataset._lat_start):  # a segment with no frames left points at the last stored one; it reads none
        latent_start = dataset._lat_start[np.minimum(dataset._latent_docs[doc] + first, len(dataset._lat_start) - 1)]
    else:
        latent_start = np.zeros(len(seg), dtype=np.int64)
    # a whole document (planned without walking its frames) must use all of its latents: its FRAME count
    # differing from latents.idx, or a segment with more FRAMEs than stored frames (e.g. planned as text), is
    # explained by frame_positions, which raises DatasetFormatError naming the document
    return SegmentTable(tokens=dataset._tok_flat, latents=dataset._lat_flat, frame_shape=dataset._frame_shape,
                        latent_dtype=dataset.latent_dtype, row_segments=np.array([len(p) for p in plans], np.int64),
                        token_start=dataset._tok_start[doc] + start, length=end - start, latent_start=latent_start,
                        frames_available=available, exact=(start == 0) & (end == dataset.token_lengths[doc]),
                        explain=lambda g: dataset.frame_positions(int(doc[g])))


def layout_row(dataset: MultimodalDataset, plan: np.ndarray, patch_size: int, copies: int = 1) -> SequenceLayout:
    """Read one planned row: each segment becomes a document of TextParts and FrameParts (patchified); with
    copies = 2 each frame is a noised FramePart followed by a clean one of the same patches (frame_copies.py)."""
    check_copies(copies)
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
        layout.documents.append(with_clean_copies(parts) if copies == 2 else parts)
    return layout
