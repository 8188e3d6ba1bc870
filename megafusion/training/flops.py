"""Model FLOPs of one training step (forward + backward), and the step count a FLOPs budget buys.

    mix = TokenMix.estimate(cfg, latent_fraction=0.5)               # before training (analytic mask density)
    mix = TokenMix.from_layout(layout, scale=num_microbatches * dp)   # measured on a batch's AttentionLayout
    flops = flops_per_step(build_transformer_config(cfg), mix)
    steps = steps_from_flops_budget(cfg.training.flops_budget, flops)

The formula (docs/flops.md has the derivation and a worked example). With T = T_text + T_lat positions in the step,
K = the sum over every query position of the number of keys its attention mask lets it see, L layers, h = hidden
size, a = num_attention_heads * kv_channels (= h unless kv_channels is set), g = num_query_groups * kv_channels:

    FLOPs/step = 6 * N_active * T                        dense matmuls: 2 FLOPs per multiply-add, x3 fwd+bwd
               + 12 * L * a * K                          attention scores QK^T and AV: 2 matmuls x 2 x 3
               + 6 * V_pad * h * T_text                  LM head on text positions
               + 6 * 2 * patch_dim * h * T_lat           patch embedding in + velocity head out, latent positions

    N_active (per token, per layer, summed over L) = attention projections  h*a + 2*h*g + a*h
                                                   + FFN  m*h*f              (m = 3 for SwiGLU, 2 for GELU)
      with per-modality FFNs a token runs only its modality's FFN, so the FFN counts once per token;
      with MoE (num_moe_experts set): router h*E + topk * m*h*f_expert (+ m*h*f_shared for shared experts),
      for the tokens of the modalities in config.moe_modalities (model.moe.modalities); the others run dense FFNs.

It counts model FLOPs (what MFU uses): activation recompute, elementwise ops (norms, activations, softmax, RoPE),
embedding lookups and the per-image timestep MLP (O(blocks), not O(tokens)) are left out. Every position of the
packed rows counts as a token, padding included (the hardware computes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megafusion.data.batch import MODALITY_IMAGE


@dataclass(frozen=True)
class TokenMix:
    """What one optimizer step processes, summed over the whole global batch."""

    text_tokens: float
    """Positions that are not latent patches (text, BOI/EOI, padding)."""
    latent_tokens: float
    """Latent patch positions."""
    attended_keys: float
    """Sum over all query positions of the keys each may attend to (mask density x S^2 x sequences)."""

    @property
    def tokens(self) -> float:
        return self.text_tokens + self.latent_tokens

    @classmethod
    def from_layout(cls, layout, scale: float = 1.0) -> "TokenMix":
        """Exact counts of one micro-batch's AttentionLayout (its dense mask), times `scale` (micro-batches per
        step x data-parallel size) to cover the global batch."""
        image = layout.modality == MODALITY_IMAGE
        latent = float(image.sum().item())
        total = float(layout.modality.numel())
        keys = float(layout.dense_mask().sum(dtype=torch.float64).item())
        return cls(text_tokens=(total - latent) * scale, latent_tokens=latent * scale, attended_keys=keys * scale)

    @classmethod
    def estimate(cls, cfg, latent_fraction: float, document_length: Optional[int] = None,
                 sequences: Optional[int] = None) -> "TokenMix":
        """Analytic counts for causal attention with bidirectional visual blocks.

        Each packed row of S = data.seq_length positions holds S / D documents of D = document_length positions
        (default S). A document with n = latent_fraction * D latent positions in blocks of F =
        model.patches_per_frame positions has D(D+1)/2 causal keys plus F(F-1)/2 extra per block (inside a block a
        query also sees the later positions of its block). `sequences` defaults to training.global_batch_size.
        Dropped CFG context and hide_noised_latents (which only remove keys) are ignored: an upper bound.
        With objective.captioning = bagel each frame is laid out as two blocks of F positions (a noised and a clean
        copy): latent_fraction then counts both copies, and the block count n / F is right as it stands."""
        if not 0.0 <= latent_fraction <= 1.0:
            raise ValueError(f"latent_fraction={latent_fraction} must be in [0, 1]")
        s = cfg.data.seq_length
        d = document_length or s
        if not 0 < d <= s:
            raise ValueError(f"document_length={d} must be in (0, data.seq_length={s}]")
        f = cfg.model.patches_per_frame
        n_seq = sequences if sequences is not None else cfg.training.global_batch_size
        docs = n_seq * s / d
        latent_per_doc = latent_fraction * d
        blocks_per_doc = latent_per_doc / f
        keys_per_doc = d * (d + 1) / 2 + blocks_per_doc * f * (f - 1) / 2
        return cls(text_tokens=docs * (d - latent_per_doc), latent_tokens=docs * latent_per_doc,
                   attended_keys=docs * keys_per_doc)


    @classmethod
    def masked_diffusion(cls, cfg, sequences: Optional[int] = None) -> "TokenMix":
        """objective.kind = masked_diffusion: every position is a discrete token with logits, and a row is one
        bidirectional document (S^2 keys; packed text rows attend less: an upper bound). Anti-masking runs every
        row twice."""
        s = cfg.data.seq_length
        n_seq = sequences if sequences is not None else cfg.training.global_batch_size
        if cfg.objective.masked_diffusion.anti_masking:
            n_seq *= 2
        return cls(text_tokens=float(n_seq * s), latent_tokens=0.0, attended_keys=float(n_seq * s * s))


def _ffn_params_per_token(config, modality: str) -> float:
    """Per-layer FFN parameters one token of `modality` runs: its MoE layer if config.moe_modalities names it (a
    plain megatron config without that field: MoE everywhere when num_moe_experts is set), else the dense FFN."""
    h = config.hidden_size
    m = 3 if getattr(config, "gated_linear_unit", False) else 2
    experts = getattr(config, "num_moe_experts", None)
    moe_modalities = getattr(config, "moe_modalities", None)
    if not experts or (moe_modalities is not None and modality not in moe_modalities):
        return m * h * config.ffn_hidden_size
    topk = config.moe_router_topk
    f_expert = getattr(config, "moe_ffn_hidden_size", None) or config.ffn_hidden_size
    shared = getattr(config, "moe_shared_expert_intermediate_size", None) or 0
    return h * experts + topk * m * h * f_expert + m * h * shared


def _padded_vocab(config) -> int:
    padded = getattr(config, "padded_vocab_size", None)
    if padded is None:
        raise ValueError("flops_per_step needs the padded vocabulary: pass a MultimodalTransformerConfig "
                         "(megafusion.model.transformer_config.build_transformer_config) or set vocab_size")
    return int(padded)


def flops_per_step(config, mix: TokenMix, vocab_size: Optional[int] = None) -> float:
    """Model FLOPs (forward + backward) of one optimizer step; the formula is in the module docstring.

    config: megatron TransformerConfig fields (hidden_size, num_layers, num_attention_heads, num_query_groups,
    kv_channels, ffn_hidden_size, gated_linear_unit, num_moe_experts, moe_router_topk, moe_ffn_hidden_size,
    moe_shared_expert_intermediate_size) plus patch_dim and padded_vocab_size, as in MultimodalTransformerConfig.
    vocab_size: the padded vocabulary, overriding config.padded_vocab_size."""
    h, layers = config.hidden_size, config.num_layers
    head_dim = config.kv_channels or h // config.num_attention_heads
    a = config.num_attention_heads * head_dim
    g = (config.num_query_groups or config.num_attention_heads) * head_dim
    attn_params = h * a + 2 * h * g + a * h
    ffn = mix.text_tokens * _ffn_params_per_token(config, "text") + mix.latent_tokens * _ffn_params_per_token(
        config, "image")
    vocab = vocab_size if vocab_size is not None else _padded_vocab(config)
    dense = 6.0 * layers * (attn_params * mix.tokens + ffn)
    attention = 12.0 * layers * a * mix.attended_keys
    lm_head = 6.0 * vocab * h * mix.text_tokens
    latent_io = 6.0 * 2 * config.patch_dim * h * mix.latent_tokens
    return dense + attention + lm_head + latent_io


def steps_from_flops_budget(budget: float, flops_per_step_value: float) -> int:
    """Optimizer steps a FLOPs budget buys: floor(budget / FLOPs per step) (never more than the budget)."""
    if flops_per_step_value <= 0:
        raise ValueError(f"FLOPs per step must be positive, got {flops_per_step_value}")
    if budget is None or budget <= 0:
        raise ValueError(f"training.flops_budget must be positive, got {budget}")
    steps = int(budget // flops_per_step_value)
    if steps < 1:
        raise ValueError(f"training.flops_budget={budget:.3e} is less than one step ({flops_per_step_value:.3e} "
                         f"FLOPs); raise the budget or shrink training.global_batch_size / data.seq_length")
    return steps
