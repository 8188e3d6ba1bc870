"""MegafusionForMultimodalLM: megafusion's MultimodalModel as a plain-PyTorch Hugging Face `transformers` model.

Self-contained: it imports only torch, transformers, the standard library and its sibling configuration_megafusion.py
(relatively), as both are copied into exported folders as remote code, where megafusion is not installed. It computes
what megafusion.model.MultimodalModel computes (tests/hf/test_hf_parity.py: equal in fp32; no dropout, megafusion's
default); the state-dict mapping is megafusion/hf/adapter.py. The few fixed features it shares with megafusion
(sinusoidal_features, sincos_2d: megafusion/model/embeddings.py) are deliberate copies, since remote code cannot
import megafusion; the parity tests hold them equal.

A packed multimodal batch, batch-first [b, s] like megafusion's Batch:

    input_ids      token ids (a placeholder at latent positions)
    modality       0 text (and padding), 1 latent patch
    block_ids      visual block (image / video frame) of a latent position, -1 for text
    document_ids   packed document, -1 for padding
    context_start  first key index a position may attend to (its document's start, or its media item's first
                   latent position when classifier-free guidance dropped the item's text context)
    noised         latent positions carrying noised latents z_t
    latents        [N, patch_dim] the latent positions' inputs (megafusion Batch.noisy_latents), row-major (b, s)
    latent_t       [N] flow time of each latent row

Model: embed_tokens, overwritten at latent rows by patch_embed(latents) (+ timestep_embed(latent_t) where noised, +
a fixed 2D sin-cos table with sincos2d); pre-norm layers: RoPE attention under megafusion's mask (same document,
causal or same visual block, padding sees itself; hide_noised_latents), then per-modality FFNs (dense, or MoE as
megatron-core 0.16.1's TopKRouter + SequentialMLP infer); final norm; lm_head [b, s, V_padded]; velocity_head.

`attention_hook(layer_number, q, k, v, scale) -> [b, nq, n, d]` replaces the masked SDPA of every layer (q
[b, nq, n, d], k/v [b, nkv, n, d], after RoPE; layer_number 1-based as in megatron): generation passes its KV cache
this way, as megafusion passes megatron an inference_context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_megafusion import MegafusionConfig

MODALITY_TEXT, MODALITY_IMAGE = 0, 1


@dataclass
class MegafusionOutput(ModelOutput):
    """logits [b, s, V_padded] ([b, 1, V] with logit_positions), velocity [N, patch_dim], final-normed hidden."""

    logits: Optional[torch.FloatTensor] = None
    velocity: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None


# ---------------------------------------------------------------------------------------------- fixed features
def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] flow times in [0, 1] -> [N, dim] cos/sin features of 1000 * t (fp32), as megafusion's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = F.pad(features, (0, 1))
    return features


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fp32 DiT 2D sine-cosine table (half the channels the row, half the column), raster order."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    one = torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)  # [grid, dim/2]
    rows = one[:, None, :].expand(grid, grid, dim // 2)
    cols = one[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def patch_index_in_block(modality: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[N] raster index of each latent row inside its visual block (latent rows in row-major (b, s) order)."""
    bi, si = torch.nonzero(modality == MODALITY_IMAGE, as_tuple=True)
    n = bi.numel()
    index = torch.arange(n, device=bi.device)
    if n == 0:
        return index
    block = block_ids[bi, si]
    first = torch.ones(n, dtype=torch.bool, device=bi.device)
    first[1:] = (bi[1:] != bi[:-1]) | (block[1:] != block[:-1])
    start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=0).values
    return index - start


def build_attention_mask(block_ids: torch.Tensor, context_start: torch.Tensor, valid: torch.Tensor,
                         noised: torch.Tensor, hide_noised: bool) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query (row) may attend to key (column); megafusion's AttentionLayout rule."""
    s = block_ids.shape[1]
    pos = torch.arange(s, device=block_ids.device)
    q_pos, k_pos = pos.view(1, s, 1), pos.view(1, 1, s)
    block_q, block_k = block_ids.unsqueeze(2), block_ids.unsqueeze(1)
    same_block = (block_q >= 0) & (block_q == block_k)
    allowed = (k_pos <= q_pos) | same_block
    allowed &= k_pos >= context_start.unsqueeze(2)
    allowed &= valid.unsqueeze(1)
    if hide_noised:
        allowed &= ~(noised.unsqueeze(1) & ~same_block)
    eye = torch.eye(s, dtype=torch.bool, device=block_ids.device).unsqueeze(0)
    return torch.where(valid.unsqueeze(2), allowed, eye).unsqueeze(1)


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """[b, s] positions -> [b, 1, s, head_dim] angles, megatron's non-interleaved layout cat(freqs, freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [b, s, d/2]
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """megatron's unfused RoPE: x cos + rotate_half(x) sin, rotate_half(x) = cat(-x2, x1) of x's two halves."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return x * torch.cos(angles).to(x.dtype) + torch.cat((-x2, x1), dim=-1) * torch.sin(angles).to(x.dtype)


def make_norm(config: MegafusionConfig) -> nn.Module:
    norm = nn.RMSNorm if config.norm_type == "rmsnorm" else nn.LayerNorm  # megafusion's LocalNorm: the torch ones
    return norm(config.hidden_size, eps=config.norm_eps)


# ---------------------------------------------------------------------------------------------- modules
class MegafusionTimestepEmbedding(nn.Module):
    def __init__(self, config: MegafusionConfig):
        super().__init__()
        self.dim = config.timestep_embed_dim
        self.linear_1 = nn.Linear(self.dim, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """[N] -> [N, h]"""
        x = sinusoidal_features(t, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(x)))


def by_modality(x: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor], text, image) -> torch.Tensor:
    """[b, s, h] -> text(text rows) and image(latent rows) -> [b, s, o] (BAGEL's Mixture-of-Transformers)."""
    b, s, h = x.shape
    flat = x.reshape(b * s, h)
    out = None
    for fn, index in zip((text, image), rows):
        if index.numel():
            y = fn(flat.index_select(0, index))
            out = flat.new_zeros(b * s, y.shape[-1]) if out is None else out
            out = out.index_copy(0, index, y.to(out.dtype))
    return out.view(b, s, -1)


class MegafusionProjections(nn.Module):
    """q, k, v and o projections (GQA: k and v have num_key_value_heads)."""

    def __init__(self, config: MegafusionConfig):
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self.q_proj, self.k_proj = nn.Linear(h, q, bias=bias), nn.Linear(h, kv, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(h, kv, bias=bias), nn.Linear(q, h, bias=bias)


class MegafusionAttention(nn.Module):
    """Shared projections (q_proj ... o_proj), or with modality_attention one set per modality (text.q_proj, ...,
    image.o_proj) around the same attention."""

    def __init__(self, config: MegafusionConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number  # 1-based, as megatron's
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.per_modality = config.modality_attention
        if self.per_modality:
            self.text, self.image = MegafusionProjections(config), MegafusionProjections(config)
        else:
            shared = MegafusionProjections(config)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (shared.q_proj, shared.k_proj, shared.v_proj,
                                                                  shared.o_proj)

    def _project(self, name: str, x: torch.Tensor, rows) -> torch.Tensor:
        if not self.per_modality:
            return getattr(self, name)(x)
        return by_modality(x, rows, getattr(self.text, name), getattr(self.image, name))

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask: Optional[torch.Tensor],
                attention_hook: Optional[Callable] = None, rows=None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (self._project(name, x, rows).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for name in ("q_proj", "k_proj", "v_proj"))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if attention_hook is not None:
            out = attention_hook(self.layer_number, q, k, v, self.scale)
            if tuple(out.shape) != tuple(q.shape):
                raise ValueError(f"attention_hook returned shape {tuple(out.shape)} in layer {self.layer_number}, "
                                 f"expected the query's shape {tuple(q.shape)}")
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self._project("o_proj", out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim), rows)


class MegafusionModalityNorm(nn.Module):
    def __init__(self, config: MegafusionConfig):
        super().__init__()
        self.text, self.image = make_norm(config), make_norm(config)

    def forward(self, x: torch.Tensor, rows) -> torch.Tensor:
        return by_modality(x, rows, self.text, self.image)


class MegafusionMLP(nn.Module):
    """SwiGLU (gate_proj, up_proj, down_proj) or GELU (up_proj, down_proj). `scale` [n] (a routed expert's token
    probabilities) multiplies the activations before down_proj and down_proj's bias, as megatron's expert MLP."""

    def __init__(self, config: MegafusionConfig, intermediate_size: int):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.gated else F.gelu(self.up_proj(x))
        if scale is None:
            return self.down_proj(hidden)
        hidden = (hidden * scale.unsqueeze(-1)).to(x.dtype)
        out = F.linear(hidden, self.down_proj.weight)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias.unsqueeze(0) * scale.unsqueeze(-1)
        return out


class MegafusionMoE(nn.Module):
    """megatron-core 0.16.1 TopKRouter (softmax score, no capacity, no expert bias) + SequentialMLP at inference:
    top-k of the logits then softmax over those k (or, with moe_pre_softmax, softmax over all experts then top-k,
    unnormalised); each expert scales its activations by the token's probability; outputs summed per token."""

    def __init__(self, config: MegafusionConfig):
        super().__init__()
        self.topk, self.pre_softmax = config.moe_topk, config.moe_pre_softmax
        self.router = nn.Linear(config.hidden_size, config.moe_num_experts, bias=config.mlp_bias)
        self.experts = nn.ModuleList(
            MegafusionMLP(config, config.moe_intermediate_size) for _ in range(config.moe_num_experts))

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[n, h] -> (probs [n, k], expert indices [n, k])"""
        logits = self.router(x)
        if self.pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            return torch.topk(scores, k=self.topk, dim=1)
        scores, indices = torch.topk(logits, k=self.topk, dim=1)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits), indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, indices = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(indices == e, as_tuple=True)  # tokens in ascending order, as megatron's
            if token.numel():
                out = out.index_add(0, token, expert(x.index_select(0, token), probs[token, slot]))
        return out


def build_ffn(config: MegafusionConfig, modality: Optional[str]) -> nn.Module:
    if modality is not None and config.uses_moe(modality):
        return MegafusionMoE(config)
    return MegafusionMLP(config, config.intermediate_size)


class MegafusionModalityMLP(nn.Module):
    """One FFN per modality: text (and padding) rows through `text`, latent rows through `image`."""

    def __init__(self, config: MegafusionConfig):
        super().__init__()
        self.text, self.image = build_ffn(config, "text"), build_ffn(config, "image")

    def forward(self, flat: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for module, index in zip((self.text, self.image), rows):
            if index.numel():
                out = out.index_copy(0, index, module(flat.index_select(0, index)))
        return out


class MegafusionDecoderLayer(nn.Module):
    def __init__(self, config: MegafusionConfig, layer_idx: int):
        super().__init__()
        norm = MegafusionModalityNorm if config.modality_attention else make_norm
        self.per_modality_norms = config.modality_attention
        self.input_layernorm = norm(config)
        self.self_attn = MegafusionAttention(config, layer_idx + 1)
        self.post_attention_layernorm = norm(config)
        self.modality_ffn = config.modality_ffn
        self.mlp = MegafusionModalityMLP(config) if config.modality_ffn else build_ffn(config, None)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask: Optional[torch.Tensor],
                rows: Tuple[torch.Tensor, torch.Tensor], attention_hook: Optional[Callable] = None) -> torch.Tensor:
        if self.per_modality_norms:
            x = x + self.self_attn(self.input_layernorm(x, rows), angles, mask, attention_hook, rows)
            normed = self.post_attention_layernorm(x, rows)
        else:
            x = x + self.self_attn(self.input_layernorm(x), angles, mask, attention_hook)
            normed = self.post_attention_layernorm(x)
        if not self.modality_ffn:
            return x + self.mlp(normed)
        b, s, h = normed.shape
        return x + self.mlp(normed.reshape(b * s, h), rows).view(b, s, h)


# ---------------------------------------------------------------------------------------------- models
class MegafusionPreTrainedModel(PreTrainedModel):
    config_class = MegafusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MegafusionDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, initializer_range), biases 0, norms 1 / 0 (transformers' generic
        init, which also leaves weights loaded from a checkpoint alone); the model has no other parameters."""
        super()._init_weights(module)


class MegafusionModel(MegafusionPreTrainedModel):
    """Embedding, decoder layers and final norm: a packed batch -> final-normed hidden states [b, s, h]."""

    def __init__(self, config: MegafusionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size)
        self.timestep_embed = MegafusionTimestepEmbedding(config)
        self.layers = nn.ModuleList(MegafusionDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self._patch_positions: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}  # not a buffer: never checkpointed
        self.post_init()

    def patch_positions(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._patch_positions:
            grid = self.config.latent_size // self.config.patch_size
            self._patch_positions[key] = sincos_2d(self.config.hidden_size, grid).to(device=device, dtype=dtype)
        return self._patch_positions[key]

    def embed(self, input_ids, modality, block_ids, noised, latents, latent_t) -> torch.Tensor:
        """-> [b, s, h]: token embeddings with the latent rows written over their placeholders."""
        b, s = input_ids.shape
        text = self.embed_tokens(input_ids)
        h = text.shape[-1]
        image = modality == MODALITY_IMAGE
        x = self.patch_embed(latents.to(self.patch_embed.weight.dtype))
        x = x + self.timestep_embed(latent_t) * noised[image].unsqueeze(1).to(x.dtype)
        if self.config.patch_position_embedding == "sincos2d":
            index = patch_index_in_block(modality, block_ids)
            if index.numel() and int(index.max()) >= self.config.patches_per_frame:
                raise ValueError(f"a visual block holds more than {self.config.patches_per_frame} latent positions "
                                 f"((latent_size / patch_size)^2); blocks must be single frames")
            x = x + self.patch_positions(x.device, x.dtype).index_select(0, index)
        rows = torch.nonzero(image.reshape(-1)).flatten()  # row-major (b, s): the latents' order
        return text.reshape(b * s, h).index_copy(0, rows, x.to(text.dtype)).view(b, s, h)

    def forward(self, input_ids, modality, block_ids, document_ids, context_start, noised, latents, latent_t,
                position_ids=None, attention_hook: Optional[Callable] = None) -> torch.Tensor:
        """Inputs as MegafusionForMultimodalLM.forward (already checked and defaulted) -> [b, s, h]."""
        b, s = input_ids.shape
        x = self.embed(input_ids, modality, block_ids, noised, latents, latent_t)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        angles = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = None
        if attention_hook is None:
            mask = build_attention_mask(block_ids, context_start, document_ids >= 0, noised,
                                        self.config.hide_noised_latents)
        flat_modality = modality.reshape(-1)
        rows = (torch.nonzero(flat_modality != MODALITY_IMAGE).flatten(),
                torch.nonzero(flat_modality == MODALITY_IMAGE).flatten())
        for layer in self.layers:
            x = layer(x, angles, mask, rows, attention_hook)
        return self.norm(x)


class MegafusionForMultimodalLM(MegafusionPreTrainedModel):
    """The whole model: MegafusionModel, then lm_head (logits; tied to the embedding with tie_word_embeddings)
    and velocity_head (flow-matching velocity at the latent rows)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegafusionConfig):
        super().__init__(config)
        self.model = MegafusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.velocity_head = nn.Linear(config.hidden_size, config.patch_dim)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, modality: Optional[torch.LongTensor] = None,
                block_ids: Optional[torch.LongTensor] = None, document_ids: Optional[torch.LongTensor] = None,
                context_start: Optional[torch.LongTensor] = None, noised: Optional[torch.BoolTensor] = None,
                latents: Optional[torch.FloatTensor] = None, latent_t: Optional[torch.FloatTensor] = None,
                position_ids: Optional[torch.LongTensor] = None, logit_positions: Optional[torch.LongTensor] = None,
                attention_hook: Optional[Callable] = None) -> MegafusionOutput:
        """The packed batch of the module docstring. Omitted fields default to a text-only batch of one whole
        document per row (modality 0, block_ids -1, document_ids 0, context_start 0, noised False, no latents);
        a batch with latent positions needs block_ids, latents and latent_t. position_ids (RoPE) default to
        0..s-1 per row. logit_positions [b]: logits only at that position of each row ([b, 1, V])."""
        inputs = self._checked_inputs(input_ids, modality, block_ids, document_ids, context_start, noised,
                                      latents, latent_t, position_ids)
        hidden = self.model(*inputs, attention_hook=attention_hook)
        b, s, h = hidden.shape
        image_rows = torch.nonzero(inputs[1].reshape(-1) == MODALITY_IMAGE).flatten()
        velocity = self.velocity_head(hidden.reshape(b * s, h).index_select(0, image_rows))
        selected = hidden
        if logit_positions is not None:
            logit_positions = logit_positions.to(hidden.device).reshape(-1)
            if logit_positions.shape[0] != b:
                raise ValueError(f"logit_positions has shape {tuple(logit_positions.shape)}, expected [b] = ({b},)")
            selected = hidden[torch.arange(b, device=hidden.device), logit_positions].unsqueeze(1)  # [b, 1, h]
        return MegafusionOutput(logits=self.lm_head(selected), velocity=velocity, last_hidden_state=hidden)

    def _checked_inputs(self, input_ids, modality, block_ids, document_ids, context_start, noised, latents,
                        latent_t, position_ids):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, expected [b, s]")
        (b, s), device, patch_dim = input_ids.shape, input_ids.device, self.config.patch_dim
        zeros = torch.zeros(b, s, dtype=torch.long, device=device)
        modality = zeros if modality is None else modality
        for name, value in dict(modality=modality, block_ids=block_ids, document_ids=document_ids,
                                context_start=context_start, noised=noised, position_ids=position_ids).items():
            if value is not None and tuple(value.shape) != (b, s):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected input_ids' shape [b, s] = {(b, s)}")
        image = modality == MODALITY_IMAGE
        if ((modality != MODALITY_TEXT) & ~image).any():
            raise ValueError("modality holds values other than 0 (text) and 1 (latent)")
        n = int(image.sum().item())
        for name, value in dict(block_ids=block_ids, latents=latents, latent_t=latent_t).items():
            if value is None and n:
                raise ValueError(f"{name} is required: the batch has {n} latent positions (modality == 1)")
        block_ids = zeros - 1 if block_ids is None else block_ids
        document_ids = zeros if document_ids is None else document_ids
        context_start = zeros if context_start is None else context_start
        noised = torch.zeros(b, s, dtype=torch.bool, device=device) if noised is None else noised.bool()
        if latents is None:
            latents = torch.zeros(0, patch_dim, device=device, dtype=self.model.patch_embed.weight.dtype)
        latent_t = torch.zeros(0, device=device) if latent_t is None else latent_t
        if tuple(latents.shape) != (n, patch_dim):
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected [N, patch_dim] = {(n, patch_dim)}: "
                             "one row per latent position (modality == 1), patch_dim = latent_channels * patch_size**2")
        if tuple(latent_t.shape) != (n,):
            raise ValueError(f"latent_t has shape {tuple(latent_t.shape)}, expected [N] = ({n},)")
        return input_ids, modality, block_ids, document_ids, context_start, noised, latents, latent_t, position_ids


__all__ = ["MegafusionOutput", "MegafusionPreTrainedModel", "MegafusionModel", "MegafusionForMultimodalLM"]
