"""Compiled (numba) row planning: RowPlanner.add (packing.py) over a run of documents in one call.

Planning is a sequential state machine over the document stream, so every loader worker walks every row; in
Python it cost about 40 µs per row (a few documents each), as much as building a fifth of the micro-batch.
`plan_documents` runs the same greedy rules (RowPlanner.add is their reference, and the tests compare the two)
over the documents of an epoch's order until enough rows are complete, and records the planner snapshots that
PackedRowStream keeps (sampler.py). Compiled on first use and cached next to this file.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _put(segs, n_segs, doc, start, end, first_frame):
    """Append segment (doc, start, end, first_frame); returns the new segment count."""
    segs[n_segs, 0] = doc
    segs[n_segs, 1] = start
    segs[n_segs, 2] = end
    segs[n_segs, 3] = first_frame
    return n_segs + 1


@njit(cache=True)
def _close(row_ends, n_rows, n_segs):
    """Complete the open row at segment n_segs: returns (completed rows, first open segment, fill)."""
    row_ends[n_rows] = n_segs
    return n_rows + 1, n_segs, 0


@njit(cache=True)
def plan_documents(order, start, need_rows, seq_length, ppf, token_lengths, frame_counts, positions, tokens,
                   token_start, frame_token, boi_token, fill, segs, n_segs, row_ends, snaps, snap_rows):
    """Add documents order[start], order[start + 1], ... to the packed stream.

    `ppf` is the positions one frame takes (RowPlanner.frame_cost: patches per frame times its copies), `positions`
    each whole document's positions counted the same way.

    State: segs[:n_segs] are segments (document, token_start, token_end, first_frame); those after the last
    completed row form the open row, which holds `fill` positions. Completed rows are recorded by their end in
    segs (row_ends). Before each document, when the count of completed rows differs from `snap_rows` (the count
    at the last snapshot), a snapshot is recorded: (completed rows, order index, fill, first and end open segment).

    Stops at a document boundary once need_rows rows are complete, at the end of `order`, or when the next
    document might not fit in segs / row_ends / snaps. Returns (next order index, fill, n_segs, completed rows,
    snapshots, bad): bad is -1, or a document whose FRAME tokens disagree with its frame count (nothing of it
    is added), or -2 when a frame cannot fit in an empty row.
    """
    S = seq_length
    n_rows = 0
    n_snaps = 0
    open_start = 0
    i = start
    while i < len(order) and n_rows < need_rows:
        doc = order[i]
        n = token_lengths[doc]
        nf = frame_counts[doc]
        bound = n // S + 2 * nf + 3  # segments (and completed rows) one document can add at most
        if n_segs + bound > segs.shape[0] or n_rows + bound > row_ends.shape[0] or n_snaps + 1 > snaps.shape[0]:
            break
        if n_rows != snap_rows:
            snaps[n_snaps, 0] = n_rows
            snaps[n_snaps, 1] = i
            snaps[n_snaps, 2] = fill
            snaps[n_snaps, 3] = open_start
            snaps[n_snaps, 4] = n_segs
            n_snaps += 1
            snap_rows = n_rows
        if nf == 0:  # text only: fill, cut, continue
            pos = 0
            while pos < n:
                take = min(n - pos, S - fill)
                n_segs = _put(segs, n_segs, doc, pos, pos + take, 0)
                fill += take
                pos += take
                if fill == S:
                    n_rows, open_start, fill = _close(row_ends, n_rows, n_segs)
            i += 1
            continue
        total = positions[doc]
        if total <= S - fill:  # the whole document fits: one segment
            n_segs = _put(segs, n_segs, doc, 0, n, 0)
            fill += total
            if fill == S:
                n_rows, open_start, fill = _close(row_ends, n_rows, n_segs)
            i += 1
            continue
        # walk the frames: their positions in the document and whether BOI directly precedes each
        a = token_start[doc]
        count = 0
        for t in range(n):
            if tokens[a + t] == frame_token:
                count += 1
        if count != nf:
            return i, fill, n_segs, n_rows, n_snaps, doc
        frames = np.empty(nf, dtype=np.int64)
        boi = np.empty(nf, dtype=np.bool_)
        k = 0
        for t in range(n):
            if tokens[a + t] == frame_token:
                frames[k] = t
                boi[k] = t > 0 and tokens[a + t - 1] == boi_token
                k += 1
        pos, j = 0, 0
        while pos < n:
            room = S - fill
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
                if fill == 0:
                    return i, fill, n_segs, n_rows, n_snaps, -2
                n_rows, open_start, fill = _close(row_ends, n_rows, n_segs)
                continue
            n_segs = _put(segs, n_segs, doc, pos, end, j)
            fill += cost
            pos, j = end, k
            if full:
                n_rows, open_start, fill = _close(row_ends, n_rows, n_segs)
        i += 1
    return i, fill, n_segs, n_rows, n_snaps, -1
