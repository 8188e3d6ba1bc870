"""KVCache and InferenceStep: the generation state MultimodalModel.forward takes as `inference_context`.

KVCache holds, for a batch of sequences ("rows"), the keys (after RoPE) and values of every committed position:
per layer one buffer pair [rows, kv_heads, capacity, head_dim], allocated at the layer's first write (so it takes
the local head count and dtype from the model, under tensor parallelism too), and per row the number of
committed positions `lengths` (rows may differ: prompts of different lengths, text rows next to image rows).

InferenceStep describes one forward of new positions [b, n]: which rows of that batch read which cache (`groups`:
the conditional rows of a classifier-free-guidance batch use the prompt's cache, the unconditional rows a cache of
their own that holds no prompt at all), the RoPE position of every new position, where logits are wanted, and how
many new positions each row appends when `commit()` is called after the forward. For every layer the core
attention calls `step.attention(...)`, which

  1. writes the new keys/values into each row's slots [len_r, len_r + n) of its cache. It always writes; only
     commit() advances the lengths, so the denoising steps of an image overwrite the same slots step after step
     and the prefix is never recomputed, copied or appended to;
  2. attends the new queries to the view [:, :, :max_len + n] of the buffers (no copy) under the rule of
     megafusion/model/attention/layout.py: a row's committed keys are all visible (a generated sequence is one
     document), its new keys follow the new positions' own layout (causal text, bidirectional image blocks,
     padding sees itself), anything else is masked. The mask is built once per forward (not per layer) and is
     None when every query sees every key (equal lengths and one image block, or one text token each), so the
     common steps run SDPA unmasked. A group whose cache is still empty and that spans the whole batch (the
     prompt) runs the model's own attention backend over the layout instead, as in training.

Why not megatron-core's inference contexts: StaticInferenceContext keeps one `sequence_len_offset` for the whole
batch (no per-row lengths), stores keys before RoPE and rotates the whole prefix again at every step, and has no
notion of rows that read a different cache (the CFG unconditional branch would need prefix-sized slots);
DynamicInferenceContext needs flash-attention kernels on CUDA, so it cannot run the CPU path. The state is passed
as an argument all the same, the way megatron's GPTModel takes its `inference_context`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


class CacheFullError(RuntimeError):
    """More positions than the cache was sized for (the model's context length)."""


class KVCache:
    def __init__(self, num_rows: int, capacity: int, device: Optional[torch.device] = None):
        if num_rows < 1 or capacity < 1:
            raise ValueError(f"KVCache needs num_rows >= 1 and capacity >= 1, got {num_rows} and {capacity}")
        self.num_rows, self.capacity = num_rows, capacity
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keys: Dict[int, torch.Tensor] = {}  # layer_number -> [rows, kv_heads, capacity, head_dim]
        self.values: Dict[int, torch.Tensor] = {}
        self.lengths = torch.zeros(num_rows, dtype=torch.long)  # committed positions per row (host tensor)

    # ------------------------------------------------------------------ storage
    def _buffers(self, layer: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            rows, heads, _, dim = like.shape
            shape = (self.num_rows, heads, self.capacity, dim)
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [rows, kv_heads, n, d] at each row's slots [len_r, len_r + n); return views of the keys and
        values [rows, kv_heads, max_len + n, d] (committed prefix + the new positions, no copy)."""
        if k.shape[0] != self.num_rows:
            raise ValueError(f"KVCache of {self.num_rows} rows was given keys for {k.shape[0]} rows")
        n = k.shape[2]
        lengths = self.lengths.tolist()
        top = max(lengths) + n
        if top > self.capacity:
            raise CacheFullError(f"generation needs {top} positions but the KV cache holds {self.capacity} (the "
                                 f"model's context length); shorten the prompt or the generation")
        keys, values = self._buffers(layer, k)
        if min(lengths) == max(lengths):
            keys[:, :, lengths[0]:lengths[0] + n] = k
            values[:, :, lengths[0]:lengths[0] + n] = v
        else:
            for r, start in enumerate(lengths):
                keys[r, :, start:start + n] = k[r]
                values[r, :, start:start + n] = v[r]
        return keys[:, :, :top], values[:, :, :top]

    def commit(self, advance: torch.Tensor) -> None:
        """Keep `advance[r]` of the positions last written for row r (they become part of its prefix)."""
        self.lengths += advance.to(self.lengths.dtype).cpu()

    # ------------------------------------------------------------------ rows
    def subset(self, rows: Sequence[int]) -> "KVCache":
        """A new cache holding copies of `rows` (a generation phase that only some rows take part in)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        sub = KVCache(len(index), self.capacity, self.device)
        sub.lengths = self.lengths[index].clone()
        top = int(sub.lengths.max().item()) if len(index) else 0
        for layer in self.keys:
            for src, dst in ((self.keys, sub.keys), (self.values, sub.values)):
                buffer = src[layer]
                dst[layer] = torch.zeros((len(index),) + tuple(buffer.shape[1:]), dtype=buffer.dtype,
                                         device=buffer.device)
                dst[layer][:, :, :top] = buffer.index_select(0, index.to(buffer.device))[:, :, :top]
        return sub

    def merge(self, sub: "KVCache", rows: Sequence[int]) -> None:
        """Copy back what `sub` (made by subset(rows)) committed beyond this cache's lengths."""
        for i, r in enumerate(rows):
            start, end = int(self.lengths[r]), int(sub.lengths[i])
            if end > start:
                for layer in sub.keys:
                    keys, values = self._buffers(layer, sub.keys[layer])
                    keys[r, :, start:end] = sub.keys[layer][i, :, start:end]
                    values[r, :, start:end] = sub.values[layer][i, :, start:end]
            self.lengths[r] = end


@dataclass
class CacheGroup:
    """Rows [start, end) of the forward batch read and write `cache` (which holds exactly end - start rows)."""

    cache: KVCache
    start: int
    end: int


AttentionFn = Callable[..., torch.Tensor]


@dataclass
class InferenceStep:
    groups: List[CacheGroup]
    positions: torch.Tensor  # [b, n] RoPE position of every new position
    advance: torch.Tensor  # [b] how many new positions each row appends on commit()
    logit_positions: Optional[torch.Tensor] = None  # [b] new position whose logits are wanted; None = no logits
    rope: Optional[Tuple[torch.Tensor, torch.Tensor, bool]] = None  # (cos, sin [n, b, 1, d], interleaved): set by
    # MultimodalModel.forward, applied to q and k by HybridCoreAttention
    _masks: Dict[int, Optional[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        b = self.positions.shape[0]
        covered = sorted((g.start, g.end) for g in self.groups)
        if covered[0][0] != 0 or covered[-1][1] != b or any(a[1] != c[0] for a, c in zip(covered, covered[1:])):
            raise ValueError(f"InferenceStep groups {covered} must cover rows 0..{b} exactly once")
        for g in self.groups:
            if g.cache.num_rows != g.end - g.start:
                raise ValueError(f"cache of {g.cache.num_rows} rows given for batch rows [{g.start}, {g.end})")

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float,
                  backend: AttentionFn) -> torch.Tensor:
        """q [b, nq, n, d], k/v [b, nkv, n, d] of the new positions -> [b, nq, n, d] (see the module docstring)."""
        gqa = q.shape[1] != k.shape[1]
        outs = []
        for index, g in enumerate(self.groups):
            rows = slice(g.start, g.end)
            keys, values = g.cache.write(layer, k[rows], v[rows])
            if g.start == 0 and g.end == q.shape[0] and int(g.cache.lengths.max()) == 0:
                outs.append(backend(q, k, v, layout, scale, 0.0))  # the prompt: the training attention
                continue
            if index not in self._masks:
                self._masks[index] = _group_mask(g, layout, q.shape[2])
            mask = self._masks[index]
            outs.append(F.scaled_dot_product_attention(q[rows], keys, values, attn_mask=mask, scale=scale,
                                                       enable_gqa=gqa))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def commit(self) -> None:
        for g in self.groups:
            g.cache.commit(self.advance[g.start:g.end])


def _group_mask(group: CacheGroup, layout, n: int) -> Optional[torch.Tensor]:
    """[rows, 1, n, max_len + n] bool (True = may attend), or None when every query sees every key."""
    lengths = group.cache.lengths
    own = None  # [rows, 1, n, n] the new positions among themselves; None = all visible
    if n > 1:
        own = layout.dense_mask()[group.start:group.end]
        if bool(own.all()):
            own = None
    low, top = int(lengths.min()), int(lengths.max())
    if own is None and low == top:
        return None
    rows = group.end - group.start
    device = layout.device
    keys = torch.arange(top + n, device=device)
    mask = (keys.view(1, -1) < lengths.to(device).view(-1, 1)).view(rows, 1, 1, top + n).expand(rows, 1, n, top + n)
    mask = mask.clone()
    for r, start in enumerate(lengths.tolist()):
        mask[r, :, :, start:start + n] = True if own is None else own[r]
    return mask
