"""The `segmented` backend: exact hybrid attention as a few SDPA calls over query segments, never an S x S mask.

Each packed row is cut into segments of queries that share one key structure (see layout.py for the rule):

  text run      queries [a, b) of one document with one context_start c. Keys: the visible prefix [c, a), seen
                by every query, then [a, b) causally, i.e. a causal mask aligned to the bottom-right corner of
                the [L, P + L] score block. With no prefix (P = 0) that is SDPA's own `is_causal`. Otherwise the
                run is cut into chunks of TEXT_CHUNK queries (the kernels compute a chunk's whole [L, L] own
                block, so chunks keep its wasted upper triangle small), and each chunk runs on CPU (MHA, no
                dropout) as two unmasked flash calls, the prefix plainly and the own keys with `is_causal`,
                merged by log-sum-exp (`_PrefixCausal`); elsewhere as one SDPA call with a small additive mask
                of shape [L, P + L], cached per shape.
  visual block  queries of one image / video frame: keys are the visible prefix [c, block_start) plus the whole
                block, no mask at all (bidirectional inside, everything earlier outside).
  padding       a padding query attends only to itself, so its output is its own value row.

"Visible" drops padding keys and, with `hide_noised`, the noised latents of other blocks; the keys of a segment
are then a gathered index list instead of a contiguous slice, and the result stays exact. Segments of equal
shape (kind, queries, keys) anywhere in the batch run as one batched SDPA call. The plan (segments, groups,
gather indices, masks) lives in `layout.cache`, so it is computed once per batch, not once per layer. Forward
and backward are autograd through SDPA (and `_PrefixCausal`); the per-segment pieces of q, k, v are cut by one
small autograd Function (`_FanOut`) whose backward gathers all their gradients into one buffer. At S=2048 with
half the positions in two images, fwd+bwd costs about what plain causal SDPA costs (benchmarks/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megafusion.model.attention.layout import AttentionLayout

PLAN_KEY = "segmented_plan"
TEXT_CHUNK = 256  # queries per chunk of a text run that has a prefix (see the module docstring)
CAUSAL, FULL, PAD = "causal", "full", "pad"


@dataclass
class Segment:
    """Queries [start, end) of row `row`; `index` is the segment's place in its row (position order)."""

    row: int
    index: int
    start: int
    end: int
    kind: str  # CAUSAL (text run), FULL (visual block) or PAD
    key_start: int = 0  # contiguous keys [key_start, key_end) when key_index is None
    key_end: int = 0
    key_index: Optional[torch.Tensor] = None  # gathered key positions (visible prefix + own keys)
    prefix_index: Optional[torch.Tensor] = None  # a CAUSAL segment's gathered prefix: key_index less its own keys

    @property
    def num_queries(self) -> int:
        return self.end - self.start

    @property
    def num_keys(self) -> int:
        return self.key_index.numel() if self.key_index is not None else self.key_end - self.key_start


@dataclass
class SegmentPlan:
    rows: List[List[Segment]]  # per row, covering [0, s) in position order
    groups: List[Tuple[Tuple[str, int, int], List[Segment]]]  # (kind, queries, keys) -> one SDPA call
    pads: List[Segment]
    masks: Dict[tuple, torch.Tensor] = field(default_factory=dict)

    @property
    def row_sizes(self) -> List[List[int]]:
        return [[seg.num_queries for seg in row] for row in self.rows]

    def causal_mask(self, lq: int, lk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[lq, lk] additive mask: query i sees keys j <= (lk - lq) + i (causal aligned bottom-right)."""
        key = (lq, lk, dtype, device)
        if key not in self.masks:
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
            mask = torch.zeros(lq, lk, dtype=dtype, device=device)
            self.masks[key] = mask.masked_fill_(~allowed, float("-inf"))
        return self.masks[key]


# ---------------------------------------------------------------------------------------------- planning
def build_plan(layout: AttentionLayout) -> SegmentPlan:
    """Cut every row of `layout` into segments and group equal shapes. Runs once per batch (CPU, small loops
    over segments, never over positions)."""
    device = layout.device
    block = layout.block_ids.detach().cpu()
    cs = layout.context_start.detach().cpu()
    valid = layout.valid.detach().cpu().bool()
    visible = valid & ~layout.noised.detach().cpu().bool() if layout.hide_noised else valid
    b, s = block.shape
    n_visible = torch.zeros(b, s + 1, dtype=torch.long)
    n_visible[:, 1:] = visible.long().cumsum(1)
    # runs of positions with one (validity, block, context_start); padding is one run whatever its context_start
    cs_eff = torch.where(valid, cs, torch.full_like(cs, -1))
    change = (block[:, 1:] != block[:, :-1]) | (cs_eff[:, 1:] != cs_eff[:, :-1]) | (valid[:, 1:] != valid[:, :-1])

    rows: List[List[Segment]] = []
    for r in range(b):
        bounds = [0] + (torch.nonzero(change[r]).flatten() + 1).tolist() + [s]
        runs = list(zip(bounds[:-1], bounds[1:]))
        block_r, cs_r, valid_r = block[r].tolist(), cs[r].tolist(), valid[r].tolist()
        spans = _block_spans(r, runs, block_r)
        segments: List[Segment] = []
        for a, e in runs:
            if not valid_r[a]:
                segments.append(Segment(row=r, index=len(segments), start=a, end=e, kind=PAD))
                continue
            c, bid = cs_r[a], block_r[a]
            if c > a:
                raise ValueError(f"AttentionLayout row {r}: context_start[{a}]={c} lies after the position")
            if bid >= 0:
                seg = Segment(row=r, index=len(segments), start=a, end=e, kind=FULL)
                segments.append(_set_keys(seg, c, max(c, spans[bid][0]), spans[bid][1], visible[r], n_visible[r]))
                continue
            # a text run after a prefix runs in query chunks: less of each masked upper triangle is computed
            step = TEXT_CHUNK if n_visible[r, a] > n_visible[r, c] else e - a
            for a2 in range(a, e, step):
                e2 = min(a2 + step, e)
                seg = Segment(row=r, index=len(segments), start=a2, end=e2, kind=CAUSAL)
                segments.append(_set_keys(seg, c, a2, e2, visible[r], n_visible[r]))
        rows.append(segments)

    grouped: Dict[Tuple[str, int, int], List[Segment]] = {}
    pads: List[Segment] = []
    for segments in rows:
        for seg in segments:
            if seg.key_index is not None:
                seg.key_index = seg.key_index.to(device)
                if seg.kind == CAUSAL:
                    seg.prefix_index = seg.key_index[: seg.num_keys - seg.num_queries]
            if seg.kind == PAD:
                pads.append(seg)
            else:
                grouped.setdefault((seg.kind, seg.num_queries, seg.num_keys), []).append(seg)
    return SegmentPlan(rows=rows, groups=list(grouped.items()), pads=pads)


def _set_keys(seg: Segment, c: int, own_start: int, own_end: int, visible, n_visible) -> Segment:
    """Keys of `seg`: the visible positions of [c, own_start), then all of [own_start, own_end)."""
    if int(n_visible[own_start] - n_visible[c]) == own_start - c:  # nothing hidden: one contiguous slice
        seg.key_start, seg.key_end = c, own_end
    else:
        prefix = torch.nonzero(visible[c:own_start]).flatten() + c
        seg.key_index = torch.cat([prefix, torch.arange(own_start, own_end)])
    return seg


def _block_spans(row: int, runs, block_r) -> Dict[int, Tuple[int, int]]:
    """block id -> [start, end) of its positions; a block must be one contiguous run (Batch.block_ids contract)."""
    spans: Dict[int, Tuple[int, int]] = {}
    for a, e in runs:
        bid = block_r[a]
        if bid < 0:
            continue
        if bid in spans:
            start, end = spans[bid]
            if end != a:
                raise ValueError(
                    f"AttentionLayout row {row}: visual block {bid} is not contiguous (positions {start}..{end - 1} "
                    f"and {a}..); Batch.block_ids must give each image / frame one contiguous span"
                )
            spans[bid] = (start, e)
        else:
            spans[bid] = (a, e)
    return spans


# ---------------------------------------------------------------------------------------------- the backend
def segmented_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q [b, nq, s, d], k/v [b, nkv, s, d] (nkv divides nq) -> [b, nq, s, d], equal to the `dense` backend."""
    b, nq, s, d = q.shape
    nkv = k.shape[1]
    if (b, s) != (layout.batch_size, layout.seq_length):
        raise ValueError(f"segmented attention: q has [b, s] = {(b, s)}, the layout {layout.block_ids.shape}")
    if nq % nkv != 0:
        raise ValueError(f"segmented attention: {nkv} key/value heads do not divide {nq} query heads")
    plan: SegmentPlan = layout.cached(PLAN_KEY, lambda: build_plan(layout))
    gqa = nq != nkv
    # a text run after a prefix: two unmasked CPU flash calls instead of one masked SDPA (see _PrefixCausal)
    split = q.device.type == "cpu" and not gqa and dropout_p == 0.0

    # every query / key / value piece of every segment, as views of q, k, v (see _FanOut for why)
    q_specs = [(m.row, m.start, m.end) for segments in plan.rows for m in segments]
    kv_specs = list(dict.fromkeys(spec for _, group in plan.groups for m in group for spec in _key_specs(m, split)))
    owned = len(kv_specs)  # gradients of these pieces are SDPA's own fresh tensors (see _FanOut.backward)
    kv_specs += [(m.row, m.start, m.end) for m in plan.pads]  # distinct from the keys above: padding is no key
    q_pieces = dict(zip(q_specs, _FanOut.apply(q, q_specs, len(q_specs))))
    k_pieces = dict(zip(kv_specs, _FanOut.apply(k, kv_specs, owned)))
    v_pieces = dict(zip(kv_specs, _FanOut.apply(v, kv_specs, owned)))
    pieces: List[List[Optional[torch.Tensor]]] = [[None] * len(row) for row in plan.rows]

    for (kind, lq, lk), members in plan.groups:
        qs = [q_pieces[(m.row, m.start, m.end)] for m in members]
        ks = _batched([[k_pieces[spec] for spec in _key_specs(m, split)] for m in members])
        vs = _batched([[v_pieces[spec] for spec in _key_specs(m, split)] for m in members])
        qq = qs[0] if len(members) == 1 else torch.cat(qs)
        if len(ks) == 2:  # [prefix keys, own keys]
            out = _PrefixCausal.apply(qq, ks[0], vs[0], ks[1], vs[1], scale)
        else:
            mask, causal = None, False
            if kind == CAUSAL:
                if lk == lq:
                    causal = True
                else:
                    mask = plan.causal_mask(lq, lk, q.dtype, q.device)
            out = F.scaled_dot_product_attention(
                qq, ks[0], vs[0], attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        for m, piece in zip(members, out.split(1) if len(members) > 1 else [out]):
            pieces[m.row][m.index] = piece

    for m in plan.pads:  # a padding query's only key is itself: softmax weight 1 on its own value
        own = v_pieces[(m.row, m.start, m.end)]
        pieces[m.row][m.index] = own.repeat_interleave(nq // nkv, dim=1) if gqa else own

    rows = [torch.cat(row, dim=2) if len(row) > 1 else row[0] for row in pieces]  # [1, nq, s, d] each
    return rows[0] if b == 1 else torch.cat(rows)


Spec = Tuple  # (row, start, end): positions [start, end) of one row; (row, index tensor): gathered positions


def _key_specs(seg: Segment, split: bool) -> List[Spec]:
    """Where the keys (and values) of `seg` come from: a contiguous range of its row, else a gather; with `split`,
    a text run after a prefix gives [prefix, own keys] (its own keys are its query positions)."""
    if split and seg.kind == CAUSAL and seg.num_keys > seg.num_queries:
        prefix = (seg.row, seg.prefix_index) if seg.key_index is not None else (seg.row, seg.key_start, seg.start)
        return [prefix, (seg.row, seg.start, seg.end)]
    if seg.key_index is not None:
        return [(seg.row, seg.key_index)]
    return [(seg.row, seg.key_start, seg.key_end)]


def _batched(parts: List[List[torch.Tensor]]) -> List[torch.Tensor]:
    """Per member a list of [1, h, n, d] key parts -> per part one [members, h, n, d] tensor."""
    return [ps[0] if len(ps) == 1 else torch.cat(ps) for ps in zip(*parts)]


class _PrefixCausal(torch.autograd.Function):
    """Exact attention of q [n, h, L, d] over a fully visible prefix kp/vp [n, h, P, d] followed by its own keys
    ko/vo [n, h, L, d] seen causally: the CPU flash kernel once unmasked over the prefix and once with `is_causal`
    over the own keys, the two results merged by their log-sum-exp.

    Why: one SDPA call over [prefix; own] needs an explicit [L, P + L] mask, and the CPU kernel runs ~10-15% slower
    per score under a mask (a mask read and a separate max pass per score), which at S=2048 is most of the gap to
    plain causal SDPA. The backward is exact too: the flash backward of each key part, given the merged output
    and log-sum-exp, yields that part's dk, dv and its share of dq."""

    @staticmethod
    def forward(ctx, q, kp, vp, ko, vo, scale: float):
        attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o1, l1 = attend(q, kp, vp, 0.0, False, scale=scale)  # l: [n, h, L] log-sum-exp of the scaled scores
        o2, l2 = attend(q, ko, vo, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        out = o1.float() * (l1 - lse).exp_().unsqueeze(-1) + o2.float() * (l2 - lse).exp_().unsqueeze(-1)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kp, vp, ko, vo, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kp, vp, ko, vo, out, lse = ctx.saved_tensors
        grad = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq, dkp, dvp = grad(grad_out, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq_own, dko, dvo = grad(grad_out, q, ko, vo, out, lse, 0.0, True, scale=ctx.scale)
        return dq.add_(dq_own), dkp, dvp, dko, dvo, None


class _FanOut(torch.autograd.Function):
    """x [b, h, s, d] -> one piece x[row, :, positions] [1, h, n, d] per spec (views; gathers for index specs).

    Why not plain slicing: autograd's SliceBackward / IndexSelectBackward give every piece its own zero-filled
    gradient of x's full size and then sum them, i.e. one fresh [b, h, s, d] buffer (page faults + fill) per
    segment per tensor, about 5% of a fwd+bwd at S=2048. Here the backward accumulates all pieces' gradients
    into ONE buffer in place. With one row, that buffer is the gradient of a piece spanning the whole row when
    there is one and it is among the first `owned` specs, whose gradients the caller guarantees to be fresh
    tensors nobody else holds (an SDPA call's dk / dv), so even that buffer is not allocated. Specs must be
    distinct (each piece's gradient is written once)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: List[Spec], owned: int):
        ctx.specs, ctx.shape, ctx.owned = specs, x.shape, set(specs[:owned])
        ctx.set_materialize_grads(False)  # an unused piece gets None, not a zero tensor
        outs = []
        for spec in specs:
            if len(spec) == 2:
                outs.append(x[spec[0] : spec[0] + 1].index_select(2, spec[1]))
            else:
                row, lo, hi = spec
                outs.append(x[row : row + 1, :, lo:hi])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        live = [(spec, g) for spec, g in zip(ctx.specs, grads) if g is not None]
        if not live:
            return None, None, None
        b, _, s, _ = ctx.shape
        # contiguous pieces, widest first: a range no earlier piece wrote is copied, the rest added
        written: List[List[Tuple[int, int]]] = [[] for _ in range(b)]
        ranges = sorted((spec for spec, _ in live if len(spec) == 3), key=lambda sp: sp[1] - sp[2])
        by_spec = dict(live)
        if b == 1 and ranges and ranges[0] == (0, 0, s) and ranges[0] in ctx.owned:
            grad, written[0] = by_spec[ranges.pop(0)], [(0, s)]
        else:
            grad = torch.empty(ctx.shape, dtype=live[0][1].dtype, device=live[0][1].device)
        for row, lo, hi in ranges:
            g = by_spec[(row, lo, hi)]
            for a, e, fresh in _overlaps(written[row], lo, hi):
                dst, src = grad[row, :, a:e], g[0, :, a - lo : e - lo]
                dst.copy_(src) if fresh else dst.add_(src)
        for row in range(b):  # what no piece wrote gets no gradient
            for a, e, fresh in _overlaps(written[row], 0, s):
                if fresh:
                    grad[row, :, a:e].zero_()
        for spec, g in live:
            if len(spec) == 2:
                grad[spec[0]].index_add_(1, spec[1], g[0])
        return grad, None, None


def _overlaps(written: List[Tuple[int, int]], lo: int, hi: int) -> List[Tuple[int, int, bool]]:
    """Cut [lo, hi) into (a, e, fresh) pieces, fresh = not yet in `written` (sorted disjoint ranges), and mark
    [lo, hi) written."""
    pieces, pos = [], lo
    for a, e in written:
        if e <= pos or a >= hi:
            continue
        if a > pos:
            pieces.append((pos, a, True))
        pieces.append((max(a, pos), min(e, hi), False))
        pos = min(e, hi)
    if pos < hi:
        pieces.append((pos, hi, True))
    merged = sorted(written + [(lo, hi)])
    written.clear()
    for a, e in merged:
        if written and a <= written[-1][1]:
            written[-1] = (written[-1][0], max(written[-1][1], e))
        else:
            written.append((a, e))
    return pieces
