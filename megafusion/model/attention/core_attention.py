"""HybridCoreAttention: the `core_attention` submodule of megatron's SelfAttention for megafusion.

It takes megatron's sequence-first q [s, b, nq, d] and k/v [s, b, nkv, d] (grouped-query: nkv divides nq, no
head repetition needed) plus the AttentionLayout that megafusion passes as `attention_mask`, runs the configured
backend, and returns [s, b, nq * d] like megatron's DotProductAttention.

When the layout carries a generation state (`layout.inference`, see megafusion.inference.kv_cache), the new
positions attend to the cached keys/values of earlier positions through it; the backend function is handed along
for the cases it covers (a prompt run on an empty cache).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.transformer.module import MegatronModule

from megafusion.model.attention.backends import get_attention_function
from megafusion.model.attention.layout import AttentionLayout


def apply_rope(t: torch.Tensor, rope) -> torch.Tensor:
    """RoPE on t [s, b, heads, d] from precomputed (cos, sin [s, b, 1, d], interleaved): megatron-core 0.16.1's
    _apply_rotary_pos_emb_bshd arithmetic (mscale 1, rotary over the whole head dim), so a generation step gets
    bitwise the values megatron's SelfAttention computes in training (tests/model/test_megatron_rope.py)."""
    cos, sin, interleaved = rope
    return (t * cos.to(t.dtype)) + (_rotate_half(t, interleaved) * sin.to(t.dtype))


class HybridCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("HybridCoreAttention does not support context parallelism (context_parallel_size=1)")
        self.layer_number = layer_number
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = config.hybrid_attention_backend
        self._fn = get_attention_function(self.backend)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: AttentionLayout,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if not isinstance(attention_mask, AttentionLayout):
            raise TypeError(
                f"HybridCoreAttention expects an AttentionLayout as attention_mask, got {type(attention_mask)}"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("HybridCoreAttention takes neither attention_bias nor packed_seq_params")
        s, b, nq, d = query.shape
        step = attention_mask.inference
        if step is not None and step.rope is not None:
            query, key = apply_rope(query, step.rope), apply_rope(key, step.rope)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if step is not None:
            out = attention_mask.inference.attention(self.layer_number, q, k, v, attention_mask, self.softmax_scale,
                                                     self._fn)
            return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)
        dropout = self.dropout_p if self.training else 0.0
        out = self._fn(q, k, v, attention_mask, self.softmax_scale, dropout)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)
