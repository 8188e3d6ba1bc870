"""Generation applies RoPE in the core attention from cos / sin computed once per forward
(megafusion/model/attention/core_attention.py apply_rope, with megatron's private _rotate_half): it must equal
megatron-core's own apply_rotary_pos_emb bit for bit, for both rotary layouts (a megatron upgrade that changes the
arithmetic fails here)."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from distributed import megatron_cpu_single_process
from megafusion.model.attention.core_attention import apply_rope
from megafusion.model.transformer_config import build_transformer_config
from tiny_model import tiny_config


@pytest.mark.parametrize("interleaved", [False, True])
def test_precomputed_rope_equals_megatrons(interleaved):
    config = build_transformer_config(tiny_config())
    config.rotary_interleaved = interleaved
    g = torch.Generator().manual_seed(0)
    s, b, heads, d = 7, 3, 4, 16
    t = torch.randn(s, b, heads, d, generator=g)
    angles = torch.rand(s, b, 1, d, generator=g) * 50  # per-row positions, as generation passes them
    with megatron_cpu_single_process():
        theirs = apply_rotary_pos_emb(t, angles, config)
        theirs_bf16 = apply_rotary_pos_emb(t.bfloat16(), angles, config)
    assert not config.apply_rope_fusion
    assert torch.equal(apply_rope(t, (torch.cos(angles), torch.sin(angles), interleaved)), theirs)
    assert torch.equal(apply_rope(t.bfloat16(), (torch.cos(angles), torch.sin(angles), interleaved)), theirs_bf16)
