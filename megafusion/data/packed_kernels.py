"""Compiled (numba) loops of the loader's hot path: planned segments -> every field of a Batch.

Built with numpy, a micro-batch costs a dozen calls per field (np.repeat over per-token counts, padding refills,
shifted copies, a strided copy of the frames out of the memory map and then their transpose into patches), each a
few µs of overhead, plus Python work per segment: more than reading the bytes. Here two passes do it all:

- `scan_segments` counts each segment's FRAME tokens (how many stored frames it takes) and each row's positions,
  and checks the table (bounds, frame counts, row lengths), so that `write_rows` can trust it;
- `write_rows` reads each segment's tokens from the token map and writes every position of every per-position
  field once, and where a FRAME stands, reads that frame from the latent map and writes its patches (widening
  16-bit values on the way); with copies = 2 (objective.captioning = bagel) it then writes the frame's clean copy
  (frame_copies.py): its positions as the next block, not noised, and its patches copied from the noised copy's.

collate.collate_packed_fields validates the input in Python, allocates the fields between the passes and calls
both; `collate` (hand-built layouts) and collate.patchify are the references they are tested against. Compiled
on first use and cached next to this file (numba's `cache=True`).
"""

from __future__ import annotations

from numba import njit


# what scan_segments found wrong (0: nothing); `where` says which segment (or row, and its positions)
SEGMENT_COUNT, EMPTY_SEGMENT, FRAME_COUNT, TOKENS_OUTSIDE, LATENTS_OUTSIDE, ROW_OVERFULL = 1, 2, 3, 4, 5, 6


@njit(cache=True)
def scan_segments(tokens, token_start, length, row_segments, frames_available, exact, latent_start, frame_numel,
                  n_latents, frame_token, ppf, seq_length, seg_frames, used, where) -> int:
    """Count seg_frames[g] (FRAME tokens of segment g) and used[r] (positions row r fills: a FRAME is ppf, the
    positions of all its copies), and
    check the table: the rows hold exactly its segments; no segment is empty, reaches outside `tokens`, holds
    more FRAMEs than it has stored frames (frames_available; exactly that many where `exact`: a whole document),
    or reaches past the n_latents stored values; no row holds more than seq_length positions.

    Returns 0, or the first problem's code (the constants above) with where[0] = the segment (or row; then
    where[1] = its positions).
    """
    total = 0
    for r in range(row_segments.shape[0]):
        total += row_segments[r]
    if total != length.shape[0]:
        where[0] = total
        return SEGMENT_COUNT
    g = 0
    for r in range(row_segments.shape[0]):
        u = 0
        for _ in range(row_segments[r]):
            n = length[g]
            where[0] = g
            if n <= 0:
                return EMPTY_SEGMENT
            a = token_start[g]
            if a < 0 or a + n > tokens.shape[0]:
                return TOKENS_OUTSIDE
            frames = 0
            for i in range(a, a + n):
                if tokens[i] == frame_token:
                    frames += 1
            if frames > frames_available[g] or (exact[g] and frames != frames_available[g]):
                return FRAME_COUNT
            if frames and (latent_start[g] < 0 or latent_start[g] + frames * frame_numel > n_latents):
                return LATENTS_OUTSIDE
            seg_frames[g] = frames
            u += n + frames * (ppf - 1)
            g += 1
        used[r] = u
        if u > seq_length:
            where[0], where[1] = r, u
            return ROW_OVERFULL
    return 0


@njit(cache=True)
def write_rows(tokens, token_start, length, row_segments, latents, latent_start, channels, height,
               row_units, p, k, scale, frame_token, pad_id, ppf, copies, image_id, text_id, r0,
               out_tokens, labels, loss_mask, modality, block_ids, document_ids, context_start, noised,
               patches) -> None:
    """Write rows r0, r0 + 1, ... of the [b, S] fields and their frames' patches into patches[0], [1], ...

    Per row: its segments' tokens back to back (segment k is document k of the row); a FRAME expands to ppf
    noised latent positions (block j = the row's j-th laid-out frame) and its frame, the next stored one of the
    segment from latent_start[g] on, is patchified into the next patches[f]; with copies = 2 the clean copy
    follows: ppf more positions, block j + 1, not noised, patches[f + 1] = patches[f]. Text is causal CE wherever
    the next token is text of the same segment; the tail is padding (document -1, seeing only itself).

    Patches move in units (e.g. a p=2 run of float32 as one uint64): a latent row of W values is `row_units`
    units, a run of p of them (one channel's row within a patch) k units, so
    patches[f, i*(W/p) + j, (c*p + r)*k + u] = frame[c, i*p + r, j*k + u] * scale (scale 65536 turns bfloat16 bits
    into float32 bits exactly; otherwise 1). Frames are read row by row in stored order.
    """
    S = out_tokens.shape[1]
    hp, wp = height // p, row_units // k
    frame_units = channels * height * row_units
    g = 0
    f = 0
    for rr in range(row_segments.shape[0]):
        r = r0 + rr
        pos = 0
        block = 0
        for d in range(row_segments[rr]):
            start = pos
            a = token_start[g]
            n = length[g]
            src = latent_start[g]
            for j in range(n):
                tok = tokens[a + j]
                if tok == frame_token:
                    for _ in range(ppf):
                        out_tokens[r, pos] = pad_id
                        loss_mask[r, pos] = 0.0
                        modality[r, pos] = image_id
                        block_ids[r, pos] = block
                        noised[r, pos] = True
                        document_ids[r, pos] = d
                        context_start[r, pos] = start
                        pos += 1
                    for c in range(channels):
                        for i in range(hp):
                            for q in range(p):
                                at = src + (c * height + i * p + q) * row_units
                                col = (c * p + q) * k
                                if k == 1:  # e.g. p=2 float32 as uint64: 3x faster than the loop below
                                    for x in range(wp):
                                        patches[f, i * wp + x, col] = latents[at + x] * scale
                                else:
                                    for x in range(wp):
                                        for u in range(k):
                                            patches[f, i * wp + x, col + u] = latents[at + x * k + u] * scale
                    src += frame_units
                    block += 1
                    f += 1
                    if copies == 2:  # BAGEL: the clean copy, its own block right after the noised one
                        for _ in range(ppf):
                            out_tokens[r, pos] = pad_id
                            loss_mask[r, pos] = 0.0
                            modality[r, pos] = image_id
                            block_ids[r, pos] = block
                            noised[r, pos] = False
                            document_ids[r, pos] = d
                            context_start[r, pos] = start
                            pos += 1
                        patches[f, :, :] = patches[f - 1, :, :]
                        block += 1
                        f += 1
                else:
                    out_tokens[r, pos] = tok
                    loss_mask[r, pos] = 0.0 if (j == n - 1 or tokens[a + j + 1] == frame_token) else 1.0
                    modality[r, pos] = text_id
                    block_ids[r, pos] = -1
                    noised[r, pos] = False
                    document_ids[r, pos] = d
                    context_start[r, pos] = start
                    pos += 1
            g += 1
        for q in range(pos, S):
            out_tokens[r, q] = pad_id
            loss_mask[r, q] = 0.0
            modality[r, q] = text_id
            block_ids[r, q] = -1
            noised[r, q] = False
            document_ids[r, q] = -1
            context_start[r, q] = q
        for q in range(S - 1):
            labels[r, q] = out_tokens[r, q + 1]
        labels[r, S - 1] = pad_id
