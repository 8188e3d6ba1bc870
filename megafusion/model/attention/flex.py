"""The `flex` backend (GPU default): torch.nn.attention.flex_attention with a BlockMask built from the layout.

The mask_mod states layout.py's rule element-wise from the per-position tensors (block_ids, context_start, valid,
noised); `create_block_mask` turns it into a BlockMask whose empty tiles the kernel skips (later documents,
keys after a text query, other documents' images). The BlockMask is built once per batch and kept in
`layout.cache`. On CUDA the attention call goes through one module-level `torch.compile(flex_attention)`, which
generates the fused kernel (forward and backward). On CPU the call runs PyTorch's eager flex_attention
(forward only: PyTorch has no CPU flex backward, so inputs that require grad get a clear error naming the
`segmented` backend); that path exists for tests and inspection.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megafusion.model.attention.layout import AttentionLayout

BLOCK_MASK_KEY = "flex_block_mask"
_compiled_flex: Optional[Callable] = None


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError as err:  # torch < 2.5
        raise ImportError(
            f"attention_backend=flex needs torch.nn.attention.flex_attention (PyTorch >= 2.5, found "
            f"{torch.__version__}); use attention_backend=segmented or dense instead"
        ) from err
    return module


def mask_mod_for(layout: AttentionLayout) -> Callable:
    """layout.py's rule as a flex mask_mod(b, h, q_idx, kv_idx) -> bool (vmap-friendly: no data-dependent
    control flow)."""
    block, context_start = layout.block_ids, layout.context_start
    valid, noised, hide_noised = layout.valid, layout.noised, layout.hide_noised

    def mask_mod(b, h, q_idx, kv_idx):
        block_q, block_k = block[b, q_idx], block[b, kv_idx]
        same_block = (block_q >= 0) & (block_q == block_k)
        allowed = ((kv_idx <= q_idx) | same_block) & (kv_idx >= context_start[b, q_idx]) & valid[b, kv_idx]
        if hide_noised:
            allowed = allowed & ~(noised[b, kv_idx] & ~same_block)
        valid_q = valid[b, q_idx]
        return (valid_q & allowed) | (~valid_q & (q_idx == kv_idx))  # padding attends to itself only

    return mask_mod


def build_block_mask(layout: AttentionLayout):
    module = _flex_module()
    s = layout.seq_length
    return module.create_block_mask(
        mask_mod_for(layout), B=layout.batch_size, H=None, Q_LEN=s, KV_LEN=s, device=layout.device
    )


def _attention_fn(device: torch.device) -> Callable:
    global _compiled_flex
    module = _flex_module()
    if device.type != "cuda":
        return module.flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(module.flex_attention, dynamic=False)
    return _compiled_flex


def flex_attention_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q [b, nq, s, d], k/v [b, nkv, s, d] (nkv divides nq) -> [b, nq, s, d]."""
    if dropout_p > 0.0:
        raise ValueError(
            f"attention_backend=flex has no attention dropout (got {dropout_p}); set model.attention_dropout=0 "
            f"or use attention_backend=dense"
        )
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError(
            "attention_backend=flex has no backward on CPU (PyTorch implements flex_attention's backward for "
            "GPUs only); use attention_backend=segmented (the CPU default) or dense for training on CPU"
        )
    if q.device != layout.device:
        raise ValueError(f"flex attention: q is on {q.device} but the AttentionLayout on {layout.device}")
    block_mask = layout.cached(BLOCK_MASK_KEY, lambda: build_block_mask(layout))
    return _attention_fn(q.device)(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
