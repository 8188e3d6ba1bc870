"""FLOPs per step against a hand count, the mask density from an AttentionLayout, and budget -> steps."""

from types import SimpleNamespace

import pytest
import torch

from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig
from megafusion.data.batch import MODALITY_IMAGE, MODALITY_TEXT
from megafusion.model.attention.layout import AttentionLayout
from megafusion.training.flops import TokenMix, flops_per_step, steps_from_flops_budget


def tiny(**overrides):
    values = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, kv_channels=None,
                  ffn_hidden_size=128, gated_linear_unit=True, num_moe_experts=None, moe_router_topk=2,
                  moe_ffn_hidden_size=None, moe_shared_expert_intermediate_size=None, patch_dim=16,
                  padded_vocab_size=512)
    values.update(overrides)
    return SimpleNamespace(**values)


def one_row_layout():
    """S = 12: text 0..3, one image block at 4..7, text 8..11; one document, no padding."""
    s = 12
    modality = torch.full((1, s), MODALITY_TEXT)
    modality[0, 4:8] = MODALITY_IMAGE
    block = torch.full((1, s), -1)
    block[0, 4:8] = 0
    return AttentionLayout(block_ids=block, context_start=torch.zeros(1, s, dtype=torch.long),
                           valid=torch.ones(1, s, dtype=torch.bool), noised=modality == MODALITY_IMAGE,
                           modality=modality)


def test_layout_mix_counts_causal_plus_block_keys():
    mix = TokenMix.from_layout(one_row_layout())
    # causal: 1 + 2 + ... + 12 = 78 keys; inside the 4-position block queries also see later block positions:
    # 3 + 2 + 1 + 0 = 6 more
    assert (mix.text_tokens, mix.latent_tokens, mix.attended_keys) == (8, 4, 84)
    assert TokenMix.from_layout(one_row_layout(), scale=3).attended_keys == 252


def test_analytic_estimate_matches_the_layout():
    cfg = Config(model=ModelConfig(latent_size=4, patch_size=2), data=DataConfig(seq_length=12),
                 training=TrainingConfig(micro_batch_size=1, global_batch_size=1))
    assert cfg.model.patches_per_frame == 4
    est = TokenMix.estimate(cfg, latent_fraction=4 / 12)
    exact = TokenMix.from_layout(one_row_layout())
    assert est.text_tokens == pytest.approx(exact.text_tokens)
    assert est.latent_tokens == pytest.approx(exact.latent_tokens)
    assert est.attended_keys == pytest.approx(exact.attended_keys)
    # two documents of 6 per row: 2 * (21 + 0 blocks ... ) with no latents
    est_docs = TokenMix.estimate(cfg, latent_fraction=0.0, document_length=6, sequences=2)
    assert est_docs.attended_keys == pytest.approx(2 * 2 * 21)


def test_dense_model_against_hand_count():
    mix = TokenMix.from_layout(one_row_layout())
    # per layer: q 64*64 + k,v 2*64*32 + out 64*64 = 12288; SwiGLU FFN 3*64*128 = 24576 (one modality's FFN)
    n_active = 2 * (12288 + 24576)  # 73728
    dense = 6 * n_active * 12  # 5,308,416
    attention = 12 * 2 * 64 * 84  # 129,024
    lm_head = 6 * 512 * 64 * 8  # 1,572,864 on the 8 text positions
    latent_io = 6 * 2 * 16 * 64 * 4  # 49,152: patch embedding + velocity head on the 4 latent positions
    assert dense + attention + lm_head + latent_io == 7_059_456
    assert flops_per_step(tiny(), mix) == 7_059_456


def test_moe_counts_topk_experts_and_gelu_counts_two_matrices():
    mix = TokenMix(text_tokens=10, latent_tokens=0, attended_keys=0)
    moe = tiny(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    # router 64*8 + 2 experts * 3*64*32
    per_layer = 12288 + 64 * 8 + 2 * 3 * 64 * 32
    assert flops_per_step(moe, mix) == 6 * 2 * per_layer * 10 + 6 * 512 * 64 * 10
    gelu = tiny(gated_linear_unit=False)
    assert flops_per_step(gelu, mix) == 6 * 2 * (12288 + 2 * 64 * 128) * 10 + 6 * 512 * 64 * 10
    # kv_channels decouples the attention width from hidden_size
    wide = tiny(kv_channels=32)  # a = 4*32 = 128, g = 2*32 = 64
    attn = 64 * 128 + 2 * 64 * 64 + 128 * 64
    mix_k = TokenMix(text_tokens=1, latent_tokens=0, attended_keys=5)
    expected = 6 * 2 * (attn + 3 * 64 * 128) * 1 + 12 * 2 * 128 * 5 + 6 * 512 * 64 * 1
    assert flops_per_step(wide, mix_k) == expected


def test_moe_counts_experts_only_for_the_modalities_that_have_them():
    mix = TokenMix(text_tokens=10, latent_tokens=6, attended_keys=0)
    image_moe = tiny(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_modalities=("image",))
    attn, dense_ffn, moe_ffn = 12288, 3 * 64 * 128, 64 * 8 + 2 * 3 * 64 * 32
    ffn = 10 * dense_ffn + 6 * moe_ffn  # text tokens run the dense FFN, latent tokens the image experts
    expected = 6 * 2 * (attn * 16 + ffn) + 6 * 512 * 64 * 10 + 6 * 2 * 16 * 64 * 6
    assert flops_per_step(image_moe, mix) == expected


def test_budget_to_steps():
    assert steps_from_flops_budget(1e18, 3e15) == 333
    assert steps_from_flops_budget(6e15, 3e15) == 2
    with pytest.raises(ValueError, match="training.flops_budget"):
        steps_from_flops_budget(1e15, 3e15)
    with pytest.raises(ValueError, match="positive"):
        steps_from_flops_budget(1e18, 0)
