"""Compiled (numba) loop of the loader's hot path: packed rows -> the per-position fields of a Batch.

Built with numpy, these fields cost a dozen calls per field (np.repeat over per-token counts, padding refills,
shifted copies), each a few µs of overhead: most of a micro-batch's collation. This loop writes every position
of every field once. collate.collate_packed_fields validates its input in Python and calls it; `collate`
(hand-built layouts) is the reference it is tested against. Latents stay with numpy (collate.py: a sequential
copy from the memory map, then an in-cache transpose), which beat a compiled strided patchify on cold data.
Compiled on first use and cached next to this file (numba's `cache=True`).
"""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def fill_positions(toks, row_ntok, seg_len, row_nseg, frame_token, pad_id, ppf, image_id, text_id,
                   tokens, labels, loss_mask, modality, block_ids, document_ids, context_start, noised,
                   used) -> int:
    """Write the [b, S] fields of b packed rows; returns -1, or the first row with more than S positions (then
    nothing is written).

    toks: the rows' token streams back to back (one frame_token per frame); row_ntok[r] tokens of row r, in
    row_nseg[r] document segments of seg_len[...] tokens (segments of all rows back to back). A FRAME expands to
    ppf latent positions (block k = the row's k-th frame); text is causal CE wherever the next token is text of
    the same segment; a row's tail is padding (document -1, seeing only itself). used[r]: positions row r fills.
    """
    b, S = tokens.shape
    t = 0
    for r in range(b):
        u = 0
        for i in range(t, t + row_ntok[r]):
            u += ppf if toks[i] == frame_token else 1
        used[r] = u
        t += row_ntok[r]
    for r in range(b):
        if used[r] > S:
            return r
    t = 0
    sg = 0
    for r in range(b):
        pos = 0
        frame = 0
        for k in range(row_nseg[r]):
            start = pos
            n = seg_len[sg]
            sg += 1
            for j in range(n):
                tok = toks[t]
                if tok == frame_token:
                    for _ in range(ppf):
                        tokens[r, pos] = pad_id
                        loss_mask[r, pos] = 0.0
                        modality[r, pos] = image_id
                        block_ids[r, pos] = frame
                        noised[r, pos] = True
                        document_ids[r, pos] = k
                        context_start[r, pos] = start
                        pos += 1
                    frame += 1
                else:
                    tokens[r, pos] = tok
                    loss_mask[r, pos] = 0.0 if (j == n - 1 or toks[t + 1] == frame_token) else 1.0
                    modality[r, pos] = text_id
                    block_ids[r, pos] = -1
                    noised[r, pos] = False
                    document_ids[r, pos] = k
                    context_start[r, pos] = start
                    pos += 1
                t += 1
        for q in range(pos, S):
            tokens[r, q] = pad_id
            loss_mask[r, q] = 0.0
            modality[r, q] = text_id
            block_ids[r, q] = -1
            noised[r, q] = False
            document_ids[r, q] = -1
            context_start[r, q] = q
        for q in range(S - 1):
            labels[r, q] = tokens[r, q + 1]
        labels[r, S - 1] = pad_id
    return -1
