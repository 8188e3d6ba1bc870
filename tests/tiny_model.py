"""A tiny random MultimodalModel for generation tests (one CPU process, megatron parallel state at TP=PP=1)."""

from __future__ import annotations

import torch

from megafusion.config.schema import Config, DataConfig, ModelConfig, ObjectiveConfig, TrainingConfig
from megafusion.model import MultimodalModel
from megafusion.model.transformer_config import build_transformer_config

VOCAB, CONTEXT = 200, 160
LATENT_SIZE, PATCH, CHANNELS = 4, 2, 4  # 4 patches per frame, patch_dim 16
PATCHES, PATCH_DIM = (LATENT_SIZE // PATCH) ** 2, CHANNELS * PATCH * PATCH


def tiny_config(**model) -> Config:
    from megafusion.config.schema import MoEConfig

    if isinstance(model.get("moe"), dict):
        model["moe"] = MoEConfig(**model["moe"])
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  vocab_size=VOCAB, latent_channels=CHANNELS, latent_size=LATENT_SIZE, patch_size=PATCH,
                  transformer_impl="local")
    fields.update(model)
    captioning = "bagel" if fields.get("hide_noised_latents") else "transfusion"
    return Config(model=ModelConfig(**fields), data=DataConfig(seq_length=CONTEXT),
                  objective=ObjectiveConfig(captioning=captioning), training=TrainingConfig(precision="fp32"))


def tiny_model(seed: int = 0, **model) -> MultimodalModel:
    torch.manual_seed(seed)
    return MultimodalModel(build_transformer_config(tiny_config(**model))).eval()
