"""MultimodalTransformerConfig: megatron's TransformerConfig plus the fields of the multimodal model.

`build_transformer_config(cfg)` turns the megafusion config tree (model + parallel + training sections) into
it; megatron modules read their usual fields, megafusion modules read the extra ones below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.config.schema import Config, MoEConfig


@dataclass
class MultimodalTransformerConfig(TransformerConfig):
    vocab_size: int = 0
    """Tokenizer vocabulary before padding."""
    latent_channels: int = 4
    """Channels of the frozen encoder's latent."""
    latent_size: int = 16
    """Height = width of one image's latent grid."""
    patch_size: int = 2
    """Patch side p; patch_dim = latent_channels * p * p."""
    modality_ffn: bool = True
    """Separate text and image FFN weights."""
    modality_attention: bool = False
    """Separate text and image QKV / output projections and norms around one shared attention (BAGEL's MoT)."""
    timestep_embed_dim: int = 256
    """Sinusoidal flow-time feature width."""
    patch_position_embedding: str = "none"
    """none | sincos2d: a fixed 2D sine-cosine embedding of each patch's row and column in its image."""
    hybrid_attention_backend: str = "segmented"
    """Resolved backend of megafusion.model.attention (never `auto` here)."""
    hide_noised_latents: bool = False
    """Noised latent positions invisible to later positions outside their block."""
    rotary_base: float = 10000
    """RoPE base over positions 0..s-1 of the packed sequence."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times tensor_model_parallel_size (megatron's convention)."""
    share_embeddings_and_output_weights: bool = False
    """Tie the LM head to the token embedding."""
    transformer_impl: str = "local"
    """local (megatron's torch layers) or transformer_engine; resolved from model.transformer_impl (never auto)."""
    latent_io: bool = True
    """Patch and timestep embeddings and the velocity head (the flow-matching family); the masked-diffusion family
    reads and predicts discrete tokens only and builds none of them."""
    ffn_modalities: Tuple[str, ...] = ("text", "image")
    """FFN paths of a modality FFN (model.modality_ffn): text and image; the masked-diffusion family adds audio
    (its discrete modalities route by Batch.token_modality through AttentionLayout.route)."""
    moe_modalities: Tuple[str, ...] = ()
    """Modalities (text, image) whose FFN is megatron's MoE layer (model.moe.modalities); empty = dense FFNs.
    The MoE fields themselves are megatron's (num_moe_experts, moe_router_topk, ...)."""

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tensor_model_parallel_size."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron's convention: pad the vocabulary so every tensor-parallel shard has the same multiple of
    `divisible_by` rows."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def default_ffn_hidden_size(hidden_size: int, activation: str) -> int:
    if activation == "swiglu":  # keep the parameter count of a 4h GELU FFN, rounded to 64
        return ((8 * hidden_size // 3) + 63) // 64 * 64
    return 4 * hidden_size


def build_transformer_config(cfg: Config, *, use_cpu_initialization: bool = True) -> MultimodalTransformerConfig:
    from megafusion.model.attention.backends import resolve_backend

    m, p = cfg.model, cfg.parallel
    bf16 = cfg.training.precision == "bf16" or (cfg.training.precision == "auto" and torch.cuda.is_available())
    swiglu = m.activation == "swiglu"
    recompute = {"none": None, "selective": "selective", "full": "full"}[cfg.training.recompute]
    ffn_hidden_size = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation)
    transformer_impl = resolve_transformer_impl(m.transformer_impl)
    return MultimodalTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        layernorm_epsilon=m.layernorm_epsilon,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=use_cpu_initialization,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        vocab_size=m.vocab_size,
        latent_channels=m.latent_channels,
        latent_size=m.latent_size,
        patch_size=m.patch_size,
        modality_ffn=m.modality_ffn,
        ffn_modalities=("text", "image", "audio") if cfg.objective.kind == "masked_diffusion" else ("text", "image"),
        latent_io=cfg.objective.kind == "flow_matching",
        modality_attention=m.modality_attention,
        timestep_embed_dim=m.timestep_embed_dim,
        patch_position_embedding=m.patch_position_embedding,
        hybrid_attention_backend=resolve_backend(m.attention_backend),
        hide_noised_latents=m.hide_noised_latents,
        rotary_base=m.rotary_base,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
        transformer_impl=transformer_impl,
        **moe_fields(m.moe, ffn_hidden_size, transformer_impl),
    )


def moe_fields(moe: MoEConfig, ffn_hidden_size: int, transformer_impl: str) -> dict:
    """model.moe -> megatron's TransformerConfig MoE fields (nothing for dense FFNs, leaving megatron's defaults)."""
    if not moe.enabled:
        return {}
    if moe.grouped_gemm and transformer_impl != "transformer_engine":
        raise ValueError(
            f"model.moe.grouped_gemm=true needs Transformer Engine (TEGroupedMLP), but model.transformer_impl resolved "
            f"to {transformer_impl!r}; set model.moe.grouped_gemm=false (megatron's SequentialMLP)"
        )
    balancing = moe.router_load_balancing_type
    return dict(
        num_moe_experts=moe.num_experts,
        moe_modalities=tuple(moe.modalities),
        moe_router_topk=moe.router_topk,
        # top-1 after the softmax would gate every token by exactly 1 (no router gradient); megatron requires this
        moe_router_pre_softmax=moe.router_topk == 1,
        moe_ffn_hidden_size=moe.ffn_hidden_size or ffn_hidden_size,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if balancing != "none" else 0.0,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_expert_capacity_factor=moe.expert_capacity_factor,
        moe_pad_expert_input_to_capacity=moe.pad_expert_input_to_capacity,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_router_dtype=moe.router_dtype,
        moe_router_score_function=moe.router_score_function,
        moe_router_enable_expert_bias=moe.router_enable_expert_bias,
        moe_router_bias_update_rate=moe.router_bias_update_rate,
    )


def resolve_transformer_impl(name: str) -> str:
    """model.transformer_impl -> local | transformer_engine (auto: TE when it imports and CUDA is present)."""
    from megafusion.model.attention.backends import transformer_engine_available

    if name == "local":
        return "local"
    if name == "transformer_engine":
        if not transformer_engine_available():
            raise ImportError(
                "model.transformer_impl=transformer_engine needs transformer-engine (pip install "
                "transformer-engine[pytorch] on a CUDA machine); use model.transformer_impl=local"
            )
        return "transformer_engine"
    if name == "auto":
        return "transformer_engine" if torch.cuda.is_available() and transformer_engine_available() else "local"
    raise ValueError(f"model.transformer_impl={name!r} is not one of auto, local, transformer_engine")
