"""MegafusionConfig: the Hugging Face `transformers` configuration of a megafusion multimodal model.

Self-contained on purpose: it imports only the standard library and transformers, because it is copied verbatim
into exported model folders as remote code (`auto_map`, trust_remote_code=True), where megafusion is not installed.
modeling_megafusion.py (its sibling, copied alongside) holds the model.

Field names follow transformers conventions; each maps to one megafusion ModelConfig field
(megafusion/config/schema.py) and the defaults are ModelConfig's:

    vocab_size               padded vocabulary = rows of the embedding (model.vocab_size padded at TP=1)
    text_vocab_size          the tokenizer's vocabulary (model.vocab_size); ids >= it are padding rows
    num_key_value_heads      model.num_query_groups (None = num_attention_heads)
    head_dim                 model.kv_channels (None = hidden_size / num_attention_heads)
    intermediate_size        model.ffn_hidden_size (None = megafusion's default for the activation)
    hidden_act + gated_mlp   "silu" + True = swiglu; "gelu" + False = gelu (exact, as megatron's F.gelu)
    norm_type, norm_eps      model.normalization (rmsnorm | layernorm), model.layernorm_epsilon
    attention_bias, mlp_bias model.add_bias_linear (megatron has one switch: both equal)
    rope_theta               model.rotary_base
    moe_*                    model.moe.* (moe_num_experts 0 = dense FFNs; moe_pre_softmax None = topk == 1, what
                             megafusion sets)
    megafusion_model         optional: the exporting run's whole `model` config section as a plain dict, so a
                             converter can rebuild the exact megafusion ModelConfig (megafusion.hf.adapter)

Every inconsistency is a ValueError naming the field.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from transformers import PretrainedConfig

MODEL_CLASS_NAME = "MegafusionForMultimodalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_megafusion.MegafusionConfig",
    "AutoModel": f"modeling_megafusion.{MODEL_CLASS_NAME}",
}
"""What an exported folder's config.json `auto_map` holds, next to copies of this file and modeling_megafusion.py."""

MOE_MODALITIES = ("text", "image")


def default_intermediate_size(hidden_size: int, gated: bool) -> int:
    """megafusion's default FFN width: 8/3 h rounded up to 64 for SwiGLU (the parameters of a 4h GELU FFN), else 4h."""
    if gated:
        return ((8 * hidden_size // 3) + 63) // 64 * 64
    return 4 * hidden_size


class MegafusionConfig(PretrainedConfig):
    model_type = "megafusion"

    def __init__(
        self,
        vocab_size: int = 512,
        text_vocab_size: Optional[int] = None,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        intermediate_size: Optional[int] = None,
        hidden_act: str = "silu",
        gated_mlp: bool = True,
        norm_type: str = "rmsnorm",
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        latent_channels: int = 4,
        latent_size: int = 16,
        patch_size: int = 2,
        timestep_embed_dim: int = 256,
        patch_position_embedding: str = "none",
        modality_ffn: bool = True,
        modality_attention: bool = False,
        hide_noised_latents: bool = False,
        moe_num_experts: int = 0,
        moe_modalities: Optional[List[str]] = None,
        moe_topk: int = 2,
        moe_intermediate_size: Optional[int] = None,
        moe_pre_softmax: Optional[bool] = None,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        boi_token_id: int = 4,
        eoi_token_id: int = 5,
        megafusion_model: Optional[Dict[str, Any]] = None,
        **kwargs,
    ):
        self.vocab_size = int(vocab_size)
        self.text_vocab_size = int(text_vocab_size if text_vocab_size is not None else vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"MegafusionConfig.hidden_size={hidden_size} is not divisible by num_attention_heads="
                                 f"{num_attention_heads}; set head_dim explicitly")
            head_dim = hidden_size // num_attention_heads
        self.head_dim = int(head_dim)
        self.gated_mlp = bool(gated_mlp)
        self.intermediate_size = int(intermediate_size or default_intermediate_size(hidden_size, self.gated_mlp))
        self.hidden_act = hidden_act
        self.norm_type = str(norm_type).lower()
        self.norm_eps = float(norm_eps)
        self.attention_bias = bool(attention_bias)
        self.mlp_bias = bool(mlp_bias)
        self.rope_theta = float(rope_theta)
        self.initializer_range = float(initializer_range)
        self.latent_channels = int(latent_channels)
        self.latent_size = int(latent_size)
        self.patch_size = int(patch_size)
        self.timestep_embed_dim = int(timestep_embed_dim)
        self.patch_position_embedding = patch_position_embedding
        self.modality_ffn = bool(modality_ffn)
        self.modality_attention = bool(modality_attention)
        self.hide_noised_latents = bool(hide_noised_latents)
        self.moe_num_experts = int(moe_num_experts or 0)
        self.moe_modalities = list(moe_modalities) if moe_modalities is not None else list(MOE_MODALITIES)
        self.moe_topk = int(moe_topk)
        self.moe_intermediate_size = int(moe_intermediate_size or self.intermediate_size)
        self.moe_pre_softmax = bool(self.moe_topk == 1 if moe_pre_softmax is None else moe_pre_softmax)
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.megafusion_model = megafusion_model
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def patch_dim(self) -> int:
        """Width of one latent patch: latent_channels * patch_size**2."""
        return self.latent_channels * self.patch_size**2

    @property
    def patches_per_frame(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def moe_enabled(self) -> bool:
        return self.moe_num_experts > 0

    def uses_moe(self, modality: str) -> bool:
        """Whether `modality`'s FFN (text | image) is a mixture of experts."""
        return self.moe_enabled and modality in self.moe_modalities

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"MegafusionConfig.{message}")

        for name in ("vocab_size", "text_vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "latent_channels", "latent_size",
                     "patch_size", "timestep_embed_dim"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.text_vocab_size <= self.vocab_size,
              f"text_vocab_size={self.text_vocab_size} exceeds vocab_size={self.vocab_size} (the padded vocabulary)")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
              f"{self.num_attention_heads}")
        check(self.latent_size % self.patch_size == 0,
              f"latent_size={self.latent_size} is not divisible by patch_size={self.patch_size}")
        check(self.norm_type in ("rmsnorm", "layernorm"), f"norm_type={self.norm_type!r}: use rmsnorm or layernorm")
        check((self.hidden_act, self.gated_mlp) in (("silu", True), ("gelu", False)),
              f"hidden_act={self.hidden_act!r} with gated_mlp={self.gated_mlp}: megafusion has swiglu (silu, "
              f"gated_mlp=True) and gelu (gelu, gated_mlp=False)")
        check(self.patch_position_embedding in ("none", "sincos2d"),
              f"patch_position_embedding={self.patch_position_embedding!r}: use none or sincos2d")
        check(self.patch_position_embedding != "sincos2d" or self.hidden_size % 4 == 0,
              f"patch_position_embedding=sincos2d needs hidden_size divisible by 4, got {self.hidden_size}")
        check(self.moe_num_experts >= 0, f"moe_num_experts={self.moe_num_experts} must be >= 0 (0 = dense FFNs)")
        modalities = self.moe_modalities
        check(bool(modalities) and len(set(modalities)) == len(modalities) and set(modalities) <= set(MOE_MODALITIES),
              f"moe_modalities={modalities} must be a non-empty list of distinct names from {list(MOE_MODALITIES)}")
        if self.moe_enabled:
            check(self.modality_ffn, "moe_num_experts is set but modality_ffn=False: experts are per modality")
            check(1 <= self.moe_topk <= self.moe_num_experts,
                  f"moe_topk={self.moe_topk} must be in [1, moe_num_experts={self.moe_num_experts}]")
            check(self.moe_intermediate_size > 0, f"moe_intermediate_size must be positive, got "
                  f"{self.moe_intermediate_size}")
