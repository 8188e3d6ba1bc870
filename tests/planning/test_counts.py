"""The planner's parameter counts (megafusion/planning/counts.py) equal the models megafusion builds: tiny models
instantiated in one process (every architecture switch), and the cluster presets built on the meta device at
their launch layouts with per-rank shapes (tests/planning/meta_build.py), summed over ranks."""

from __future__ import annotations

import pytest
import torch

from distributed import megatron_cpu_single_process
from megafusion.config import load_config
from megafusion.planning.counts import count_parameters
from tiny_model import tiny_config, tiny_model

ARCHITECTURES = {
    "dense modality FFN, GQA": {},
    "one shared FFN": dict(modality_ffn=False),
    "multi-head attention": dict(num_query_groups=4),
    "tied LM head": dict(share_embeddings_and_output_weights=True),
    "MoE on image, own expert width": dict(moe=dict(num_experts=4, modalities=["image"], ffn_hidden_size=32)),
    "MoE on text, top-1": dict(moe=dict(num_experts=4, modalities=["text"], router_topk=1)),
    "MoE with a shared expert": dict(moe=dict(num_experts=4, ffn_hidden_size=32, shared_expert_intermediate_size=48)),
    "Mixture-of-Transformers attention": dict(modality_attention=True),
    "biases, LayerNorm, GELU": dict(add_bias_linear=True, normalization="LayerNorm", activation="gelu"),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_counts_equal_an_instantiated_tiny_model(name):
    overrides = ARCHITECTURES[name]
    with megatron_cpu_single_process():
        model = tiny_model(**overrides)
        built = {n: p.numel() for n, p in model.named_parameters()}
    counts = count_parameters(tiny_config(**overrides))
    assert counts.total == sum(built.values())
    assert counts.per_rank(0, 1)[0] + counts.per_rank(0, 1)[1] == sum(built.values())
    groups = counts.by_group()
    assert groups["embedding"] == built["embedding.word_embeddings.weight"]
    assert groups.get("lm_head", 0) == built.get("output_layer.weight", 0)
    ffn = {g: sum(n for k, n in built.items() if f".mlp.{g}." in k) for g in ("text", "image")}
    if overrides.get("modality_ffn", True):
        assert (groups["ffn.text"], groups["ffn.image"]) == (ffn["text"], ffn["image"])


def test_active_parameters_count_top_k_experts_and_the_modalitys_own_weights():
    moe = dict(num_experts=4, modalities=["image"], ffn_hidden_size=32, router_topk=2)
    counts = count_parameters(tiny_config(moe=moe))
    dense = count_parameters(tiny_config())
    layers, h = 2, 64
    one_expert = 3 * 32 * h
    # image tokens: the router (4 x h) and 2 of 4 experts instead of the dense image FFN (3 x 96 x h)
    assert counts.active("image") == dense.active("image") - layers * 3 * 96 * h + layers * (4 * h + 2 * one_expert)
    assert counts.active("text") == dense.active("text")
    # text tokens use the token embedding and the LM head, image tokens the patch / timestep / velocity layers
    by = dense.by_group()
    assert dense.active("text") - dense.active("image") == by["embedding"] + by["lm_head"] - by["latent_io"]
    assert dense.total == dense.active("text") + by["ffn.image"] + by["latent_io"]


@pytest.mark.parametrize("preset", ["7b", "reference", "reference_moe32", "reference_moe1008", "7b_moe"])
def test_presets_built_per_rank_at_their_launch_layout_sum_to_the_planned_total(preset):
    from meta_build import layout_parameter_total, one_process_group, stage_shapes

    cfg = load_config(preset)
    counts = count_parameters(cfg)
    assert layout_parameter_total(cfg, dp=16) == counts.total
    pp = cfg.parallel.pipeline_model_parallel_size
    with one_process_group():  # what one GPU of each stage holds (the memory plan's weights term)
        for stage in range(pp):
            shapes = stage_shapes(cfg, stage, dp=16)
            dense = sum(torch.Size(s).numel() for s, expert in shapes.values() if not expert)
            expert = sum(torch.Size(s).numel() for s, expert in shapes.values() if expert)
            assert counts.per_rank(stage, pp)[:2] == (dense, expert)


def test_the_7b_at_tensor_parallel_4_pads_the_vocabulary_and_still_matches():
    from meta_build import layout_parameter_total

    cfg = load_config("7b", ["parallel.tensor_model_parallel_size=4"])
    counts = count_parameters(cfg)
    assert counts.padded_vocab == 32256  # 32000 rounded up to a multiple of 128 x 4
    assert layout_parameter_total(cfg, dp=8) == counts.total


def test_every_preset_loads():
    from megafusion.cli import main

    for preset in ("reference", "reference_moe32", "reference_moe128", "reference_moe1008", "7b", "7b_moe"):
        assert main(["config", "--config", preset]) == 0


@pytest.mark.parametrize("moe", [None, dict(num_experts=4, modalities=["image", "audio"], ffn_hidden_size=32)])
def test_masked_diffusion_counts_equal_its_model(moe):
    """The masked-diffusion family: no latent I/O, a third FFN for audio codes, the vocabulary used by every token."""
    import dataclasses

    from megafusion.config.schema import Config, MaskedDiffusionConfig, MoEConfig, ObjectiveConfig
    from megafusion.discrete.vocab import UnifiedVocab
    from megafusion.model import MultimodalModel
    from megafusion.model.transformer_config import build_transformer_config

    base = tiny_config(vocab_size=UnifiedVocab(150, 32, 16).size)
    model = dataclasses.replace(base.model, moe=MoEConfig(**moe)) if moe else base.model
    objective = ObjectiveConfig(kind="masked_diffusion", loss_weighting="fixed", masked_diffusion=MaskedDiffusionConfig(
        text_vocab_size=150, image_codebook_size=32, audio_codebook_size=16))
    cfg = Config(model=model, data=base.data, objective=objective, training=base.training)
    with megatron_cpu_single_process():
        torch.manual_seed(0)
        built = {n: p.numel() for n, p in MultimodalModel(build_transformer_config(cfg)).named_parameters()}
    counts = count_parameters(cfg)
    assert counts.total == sum(built.values())
    assert not any("patch_embed" in n or "velocity_head" in n or "timestep" in n for n in built)
    groups = counts.by_group()
    assert "latent_io" not in groups and groups["ffn.audio"] == sum(n for k, n in built.items() if ".mlp.audio." in k)
    assert counts.modalities == ("text", "image", "audio")
    if not moe:  # a token runs everything but the other two modalities' FFNs
        assert counts.active("text") == counts.total - groups["ffn.image"] - groups["ffn.audio"]
