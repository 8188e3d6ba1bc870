"""The `dense` backend: SDPA with the materialised [b, 1, s, s] boolean mask. The reference every other backend
is tested against; O(s^2) memory, so use it for tests and short sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafusion.model.attention.layout import AttentionLayout


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q [b, nq, s, d], k/v [b, nkv, s, d] (nq a multiple of nkv: grouped-query) -> [b, nq, s, d]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.dense_mask(), dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
