"""Planned rows of a dataset -> the Batch contract, in two compiled passes (the loader's hot path).

A micro-batch's rows are given as a `SegmentTable`: per document segment of each row, where its tokens lie in a
flat token array and where its first frame lies in a flat latent array (a dataset's two memory maps; or arrays
built by hand, `SegmentTable.from_rows`), plus what the stored frames allow (a segment with more FRAME tokens than
stored frames is an error). `collate_packed_fields` validates the tables with a few vectorized checks, counts
the frames (packed_kernels.scan_segments), allocates the fields and writes them all, patches included, in one
more pass (packed_kernels.write_rows). No Python runs per segment, position or frame.

Equal to `collate` (collate.py) of the same rows laid out as TextParts and FrameParts: every frame is noised
(dataset frames), latents are float32 (16-bit storage is widened exactly), noisy_latents is latents. With
`copies` = 2 (objective.captioning = bagel) every frame is written twice, a noised copy followed by a clean one
(frame_copies.py): equal to `collate` of the layouts expanded by frame_copies.with_clean_copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megafusion.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megafusion.data.collate import Alloc, _filled, _scratch, batch_from_fields, new_field
from megafusion.data.frame_copies import check_copies
from megafusion.data.special_tokens import SPECIAL_TOKENS


@dataclass
class SegmentTable:
    """Consecutive rows of a micro-batch whose tokens and latents lie in the same two flat arrays."""

    tokens: np.ndarray  # 1-D int token ids (e.g. a dataset's tokens.bin map)
    latents: np.ndarray  # 1-D stored latent values (float32; or float16 / bfloat16 as uint16 bit patterns)
    frame_shape: Tuple[int, int, int]  # [C, H, W] of one stored frame
    latent_dtype: torch.dtype  # what the stored values mean
    row_segments: np.ndarray  # [rows] document segments per row
    token_start: np.ndarray  # [segments] first token of the segment in `tokens`
    length: np.ndarray  # [segments] its token count
    latent_start: np.ndarray  # [segments] offset in `latents` of the segment's first frame (if it has any)
    frames_available: np.ndarray  # [segments] stored frames from there on
    exact: np.ndarray  # [segments] bool: the segment must use exactly frames_available (a whole document)
    # called with a segment's index when its FRAME tokens disagree with its stored frames; raises an error that
    # names the source (e.g. the dataset's document), else a generic one is raised
    explain: Optional[Callable[[int], None]] = None

    @classmethod
    def from_rows(cls, rows: Sequence[Tuple[Sequence[Sequence[int]], Sequence[np.ndarray]]],
                  latent_dtype: torch.dtype = torch.float32, frame_token: int = SPECIAL_TOKENS.frame) -> "SegmentTable":
        """Rows given by hand: (token ids of each segment, the row's frames as arrays [count, C, H, W] in stream
        order); every segment takes the next stored frames of its row."""
        frames = [fr for _, row_frames in rows for fr in row_frames]
        shape = tuple(frames[0].shape[1:]) if frames else (1, 1, 1)
        numel = math.prod(shape)
        seg_tokens, token_start, latent_start, available = [], [], [], []
        tok_at = lat_at = 0
        for r, (segments, row_frames) in enumerate(rows):
            given, used = sum(fr.shape[0] for fr in row_frames), 0
            for seg in segments:
                seg = np.asarray(seg, dtype=np.int32)
                seg_tokens.append(seg)
                token_start.append(tok_at)
                latent_start.append((lat_at + used) * numel)
                available.append(given - used)
                tok_at += len(seg)
                used += int(np.count_nonzero(seg == frame_token))
            if used != given:
                raise ValueError(f"row {r} holds {used} FRAME tokens but {given} frames")
            lat_at += given
        as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        return cls(tokens=np.concatenate(seg_tokens) if seg_tokens else np.zeros(0, np.int32),
                   latents=np.concatenate([fr.reshape(-1) for fr in frames]) if frames else np.zeros(0, np.float32),
                   frame_shape=shape, latent_dtype=latent_dtype,
                   row_segments=as_int([len(segments) for segments, _ in rows]),
                   token_start=as_int(token_start), length=as_int([len(t) for t in seg_tokens]),
                   latent_start=as_int(latent_start), frames_available=as_int(available),
                   exact=np.zeros(len(seg_tokens), dtype=bool))

    @property
    def rows(self) -> int:
        return len(self.row_segments)


def collate_packed(tables: Sequence[SegmentTable], seq_length: int, patch_size: int, patch_dim: int,
                   frame_token: int, pad_id: int = SPECIAL_TOKENS.pad, copies: int = 1) -> Batch:
    """Build a Batch of the tables' rows (in order), each seq_length positions; each frame laid out `copies`
    times (1, or 2: a noised and a clean copy)."""
    return batch_from_fields(collate_packed_fields(tables, seq_length, patch_size, patch_dim, frame_token, pad_id,
                                                   copies=copies))


def collate_packed_fields(tables: Sequence[SegmentTable], seq_length: int, patch_size: int, patch_dim: int,
                          frame_token: int, pad_id: int = SPECIAL_TOKENS.pad, alloc: Alloc = new_field,
                          copies: int = 1) -> Dict[str, np.ndarray]:
    """The arrays of `collate_packed`'s Batch by field name (noisy_latents is latents), written into `alloc`'s."""
    from megafusion.data.packed_kernels import scan_segments, write_rows  # numba: the loader's path only

    check_copies(copies)
    b, S, p = sum(t.rows for t in tables), seq_length, patch_size
    if b == 0:
        raise ValueError("collate_packed: no rows")
    seg_frames, n_frames, shapes, where = [], 0, set(), np.zeros(2, dtype=np.int64)
    for i, t in enumerate(tables):
        _check_lengths(t)
        frames = np.empty(len(t.length), dtype=np.int64)
        used = np.empty(t.rows, dtype=np.int64)
        problem = scan_segments(t.tokens, t.token_start, t.length, t.row_segments, t.frames_available, t.exact,
                                t.latent_start, math.prod(t.frame_shape), len(t.latents), frame_token,
                                _patches_per_frame(t.frame_shape, p) * copies, S, frames, used, where)
        if problem:
            _raise_problem(t, problem, where, sum(u.rows for u in tables[:i]), S)
        count = int(frames.sum())
        if count:
            shapes.add(tuple(t.frame_shape))
            c, h, w = t.frame_shape
            if h % p or w % p:
                raise ValueError(f"latent grid {h}x{w} is not divisible by model.patch_size={p}")
            if c * p * p != patch_dim:
                raise ValueError(f"frames of {c} channels give patches of {c * p * p} values with "
                                 f"model.patch_size={p}, but patch_dim={patch_dim}")
        seg_frames.append(count)
        n_frames += count
    if len(shapes) > 1:
        raise ValueError(f"collate_packed: the rows' frames have different shapes {sorted(shapes)}")

    shape = (b, S)
    out = {name: alloc(name, shape, dtype) for name, dtype in _POSITION_FIELDS}
    ppf = _patches_per_frame(shapes.pop(), p) if shapes else 1
    lat = alloc("latents", (n_frames * copies * ppf, patch_dim), np.float32)
    r0 = f0 = 0  # rows and laid-out frames (copies included) written so far
    for t, n in zip(tables, seg_frames):
        n *= copies
        patches = lat[f0 * ppf: (f0 + n) * ppf].reshape(n, ppf, patch_dim)
        src, starts, row_units, k, scale, dst, widen = _units(t, p, patches)
        c, h, _ = t.frame_shape
        write_rows(t.tokens, t.token_start, t.length, t.row_segments, src, starts, c, h, row_units, p, k, scale,
                   frame_token, pad_id, ppf, copies, MODALITY_IMAGE, MODALITY_TEXT, r0, *out.values(), dst)
        if widen:  # float16: the kernel wrote the bits, numpy converts
            np.copyto(patches, dst.view(np.float16))
        r0, f0 = r0 + t.rows, f0 + n
    out["latents"] = lat
    out["latent_t"] = _filled(alloc, "latent_t", (lat.shape[0],), np.float32, 1.0)
    return out


# the per-position fields in the order write_rows takes them
_POSITION_FIELDS = (("tokens", np.int64), ("labels", np.int64), ("loss_mask", np.float32), ("modality", np.int64),
                    ("block_ids", np.int64), ("document_ids", np.int64), ("context_start", np.int64),
                    ("noised", np.bool_))


def _patches_per_frame(frame_shape, p: int) -> int:
    _, h, w = frame_shape
    return (h // p) * (w // p)


def _check_lengths(t: SegmentTable) -> None:
    n = len(t.length)
    for name in ("token_start", "latent_start", "frames_available", "exact"):
        if len(getattr(t, name)) != n:
            raise ValueError(f"SegmentTable.{name} has {len(getattr(t, name))} entries for {n} segments")


def _raise_problem(t: SegmentTable, problem: int, where: np.ndarray, first_row: int, seq_length: int) -> None:
    """The error for what packed_kernels.scan_segments found (rows are numbered within the micro-batch)."""
    from megafusion.data import packed_kernels as K

    g = int(where[0])
    if problem == K.SEGMENT_COUNT:
        raise ValueError(f"SegmentTable: rows hold {g} segments but {len(t.length)} are given")
    if problem == K.EMPTY_SEGMENT:
        raise ValueError(f"segment {g} is empty; a row plan holds non-empty segments")
    if problem == K.TOKENS_OUTSIDE:
        raise ValueError(f"collate_packed: segment {g}'s tokens reach outside the {len(t.tokens)} stored tokens")
    if problem == K.LATENTS_OUTSIDE:
        raise ValueError(f"collate_packed: segment {g}'s frames reach past the {len(t.latents)} stored values")
    if problem == K.ROW_OVERFULL:
        raise ValueError(f"row {first_row + g} holds {int(where[1])} positions, more than seq_length={seq_length}")
    if t.explain is not None:
        t.explain(g)
    raise ValueError(f"segment {g}: its FRAME tokens disagree with its {int(t.frames_available[g])} stored frames")


def _units(t: SegmentTable, p: int, patches: np.ndarray):
    """How write_rows moves this table's values: (source units, segment starts in units, units per latent row,
    units per run of p values, scale, destination units, whether float16 bits still need converting)."""
    c, h, w = t.frame_shape
    src, stored = t.latents, t.latent_dtype
    if stored == torch.float32 and src.dtype == np.float32:
        # two values per uint64 when a run of p values and every segment's start allow it, else one per uint32
        per = 2 if p % 2 == 0 and not (t.latent_start & 1).any() else 1
        wide = np.uint64 if per == 2 else np.uint32
        return (src[: len(src) // per * per].view(wide), t.latent_start // per, w // per, p // per, wide(1),
                patches.view(wide), False)
    if stored == torch.bfloat16 and src.dtype == np.uint16:
        return src, t.latent_start, w, p, np.uint32(1 << 16), patches.view(np.uint32), False
    if stored == torch.float16 and src.dtype == np.uint16:
        return src, t.latent_start, w, p, np.uint16(1), _scratch(patches.shape, np.uint16), True
    raise ValueError(f"latents stored as {src.dtype} meaning {stored}: expected float32, or float16 / bfloat16 as "
                     f"uint16 bit patterns")
