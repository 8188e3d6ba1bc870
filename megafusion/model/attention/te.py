"""The `te` backend: Transformer Engine's fused DotProductAttention wherever its masks can express the layout.

Two cases, decided once per batch (the choice and its tensors live in `layout.cache`):

  text only     no visual block anywhere and every document sees exactly itself (context_start = document
                start): the batch is flattened to THD tokens [b * s, heads, d] and each document is one
                sequence of `padding_causal` attention given by cu_seqlens; each padding position is its own
                one-token sequence, so it attends to itself exactly like the reference. cuDNN / flash kernels,
                no mask tensor.
  otherwise     visual blocks (bidirectional inside, causal outside), CFG-dropped context or hidden noised
                latents are not a TE mask type: the `arbitrary` mask type with the dense [b, 1, s, s] mask
                (TE convention: True = masked out), in BSHD layout. Correct but O(s^2) memory; prefer
                attention_backend=flex for multimodal batches.

transformer_engine is imported lazily; a missing install raises ImportError naming the alternatives. One
DotProductAttention module is kept per (heads, kv heads, head dim, scale, dropout, format, mask type); the
module has no parameters, so sharing it between layers is safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megafusion.model.attention.layout import AttentionLayout

PLAN_KEY = "te_plan"
_modules: Dict[Tuple, torch.nn.Module] = {}


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # ImportError, or a broken CUDA install
        raise ImportError(
            "attention_backend=te needs transformer-engine (pip install transformer-engine[pytorch] on a CUDA "
            f"machine; import failed: {err}); use attention_backend=flex on GPU or segmented on CPU instead"
        ) from err
    return te


@dataclass
class TEPlan:
    packed: bool  # True: THD + padding_causal over documents; False: arbitrary mask
    cu_seqlens: Optional[torch.Tensor] = None  # [num_sequences + 1] int32 over the flattened b * s tokens
    max_seqlen: int = 0
    masked_out: Optional[torch.Tensor] = None  # [b, 1, s, s] bool, True where attention is NOT allowed


def build_plan(layout: AttentionLayout) -> TEPlan:
    block = layout.block_ids.detach().cpu()
    if bool((block >= 0).any()):
        return TEPlan(packed=False, masked_out=~layout.dense_mask())
    b, s = block.shape
    valid = layout.valid.detach().cpu().bool()
    cs = layout.context_start.detach().cpu()
    positions = torch.arange(s).expand(b, s)
    # one sequence per run of equal context_start; every padding position is a sequence of its own
    key = torch.where(valid, cs, -(positions + 1))
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    # a run is a document only if it starts exactly at its context_start (then every query sees its own run)
    if bool((valid & starts & (cs != positions)).any()):
        return TEPlan(packed=False, masked_out=~layout.dense_mask())
    flat_starts = torch.nonzero(starts.reshape(-1)).flatten()
    bounds = torch.cat([flat_starts, torch.tensor([b * s])])
    max_seqlen = int((bounds[1:] - bounds[:-1]).max())
    return TEPlan(packed=True, cu_seqlens=bounds.to(torch.int32).to(layout.device), max_seqlen=max_seqlen)


def _module(te, nq: int, nkv: int, d: int, scale: float, dropout_p: float, fmt: str, mask_type: str):
    key = (nq, nkv, d, float(scale), float(dropout_p), fmt, mask_type)
    if key not in _modules:
        tracker = None
        if dropout_p > 0.0:  # megatron's CUDA RNG tracker keeps dropout reproducible under tensor parallelism
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            tracker = get_cuda_rng_tracker
        _modules[key] = te.DotProductAttention(
            num_attention_heads=nq,
            kv_channels=d,
            num_gqa_groups=nkv,
            attention_dropout=dropout_p,
            qkv_format=fmt,
            attn_mask_type=mask_type,
            softmax_scale=scale,
            get_rng_state_tracker=tracker,
        )
    return _modules[key]


def te_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q [b, nq, s, d], k/v [b, nkv, s, d] (nkv divides nq) -> [b, nq, s, d]."""
    te = _import_te()
    if q.device.type != "cuda":
        raise ValueError(f"attention_backend=te runs on CUDA tensors only (got {q.device}); use segmented on CPU")
    b, nq, s, d = q.shape
    nkv = k.shape[1]
    plan: TEPlan = layout.cached(PLAN_KEY, lambda: build_plan(layout))
    if plan.packed:
        module = _module(te, nq, nkv, d, scale, dropout_p, "thd", "padding_causal")
        to_thd = lambda x: x.transpose(1, 2).reshape(b * s, x.shape[1], d)  # noqa: E731  [b*s, heads, d]
        out = module(
            to_thd(q), to_thd(k), to_thd(v),
            qkv_format="thd", attn_mask_type="padding_causal",
            cu_seqlens_q=plan.cu_seqlens, cu_seqlens_kv=plan.cu_seqlens,
            max_seqlen_q=plan.max_seqlen, max_seqlen_kv=plan.max_seqlen,
        )
    else:
        module = _module(te, nq, nkv, d, scale, dropout_p, "bshd", "arbitrary")
        to_bshd = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  [b, s, heads, d]
        out = module(
            to_bshd(q), to_bshd(k), to_bshd(v),
            attention_mask=plan.masked_out, qkv_format="bshd", attn_mask_type="arbitrary",
        )
    return out.reshape(b, s, nq, d).transpose(1, 2)  # [b, nq, s, d]
