"""Parameter counts of MultimodalModel from the config alone: total, per component, per rank, active per token.

    counts = count_parameters(cfg)                     # at cfg.parallel's TP (the padded vocabulary depends on it)
    counts.total, counts.by_group(), counts.active("text"), counts.per_rank(stage=0, layout=layout)

Every parameter tensor the model builds (megafusion/model: embeddings.py, specs.py, modality_mlp.py, moe.py,
modality_attention.py, heads.py) is one Component, with how a copy is divided over ranks:

    embedding.word_embeddings          V_pad x h                 first stage, split over TP (vocab-parallel)
    embedding.patch_embed              P x h + h                 first stage, replicated
    embedding.timestep_embed           T x h + h + h x h + h     first stage, replicated
    per layer  input / pre-FFN norm    h (RMSNorm) or 2h (LN)    replicated (x2 each with modality_attention)
               linear_qkv              (a + 2g) x h (+ bias)     split over TP   (x2 with modality_attention)
               linear_proj             h x a (+ bias h, replicated)   split over TP (x2 with modality_attention)
               FFN (per modality, or one shared)
                 dense                 m'f x h + h x f (+ m'f, + h)   split over TP (m' = 2 SwiGLU, 1 GELU)
                 MoE                   router E x h (replicated) + E experts of m'f_e x h + h x f_e (+ biases),
                                       experts split over EP; a shared expert m'f_s x h + h x f_s, split over TP
    decoder.final_layernorm            h or 2h                   last stage, replicated
    output_layer                       V_pad x h                 last stage, split over TP (none when tied on
                                                                 one stage; a synchronised copy when tied
                                                                 across stages, counted per rank, not in total)
    velocity_head                      h x P + P                 last stage, replicated

with a = heads x head_dim, g = query_groups x head_dim, P = latent_channels x patch^2, T = timestep_embed_dim.
Active per token of a modality: everything except the other modality's FFN (and attention copies with
modality_attention), the other modality's input/output layers, and for MoE the experts not in its top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megafusion.config.schema import Config
from megafusion.model.transformer_config import default_ffn_hidden_size, padded_vocab_size

FIRST, LAST, LAYERS = "first", "last", "layers"
MODALITIES = ("text", "image")
MASKED_MODALITIES = ("text", "image", "audio")  # objective.kind=masked_diffusion: discrete tokens, an audio FFN


def modalities_of(cfg: Config) -> tuple:
    return MASKED_MODALITIES if cfg.objective.kind == "masked_diffusion" else MODALITIES


@dataclass(frozen=True)
class Component:
    group: str
    """Breakdown row: embedding, latent_io, lm_head, attention, norms, ffn.text, ffn.image, ffn (shared)."""
    name: str
    """The parameter(s) counted, as named in the model's state dict ('*' = the layer index)."""
    each: int
    """Elements of one copy (one layer's for per-layer components), over all shards."""
    place: str
    """FIRST (first pipeline stage), LAST (last stage) or LAYERS (one per layer, spread over stages)."""
    split: int = 1
    """Ranks one copy is divided over: TP for tensor-parallel weights, EP for experts, 1 when replicated."""
    tensors: int = 1
    """Parameter tensors in one copy (DDP pads each one)."""
    expert: bool = False
    """Expert weights: their optimizer state is sharded over the expert-data-parallel group."""
    modality: Optional[str] = None
    """The modality whose tokens use it; None = every token."""
    active: float = 1.0
    """Share of it one token of that modality runs (top-k / E for experts)."""
    unique: bool = True
    """False for a copy of another parameter (the tied LM head on the last stage of a pipeline)."""

    def total(self, num_layers: int) -> int:
        return self.each * (num_layers if self.place == LAYERS else 1)


@dataclass
class ParameterCounts:
    components: List[Component]
    num_layers: int
    padded_vocab: int
    modalities: tuple = MODALITIES

    @property
    def total(self) -> int:
        """Distinct parameters of the model (a tied LM head counted once)."""
        return sum(c.total(self.num_layers) for c in self.components if c.unique)

    def by_group(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for c in self.components:
            if c.unique:
                out[c.group] = out.get(c.group, 0) + c.total(self.num_layers)
        return out

    def active(self, modality: str) -> int:
        """Parameters one token of `modality` runs through (Mixtral's convention: its embedding / head included)."""
        if modality not in self.modalities:
            raise ValueError(f"modality {modality!r} is not one of {self.modalities}")
        return int(round(sum(c.total(self.num_layers) * c.active for c in self.components
                             if c.unique and c.modality in (None, modality))))

    def per_rank(self, stage: int, pp: int) -> Tuple[int, int, int]:
        """(dense, expert, tensors) parameters held by one rank of pipeline stage `stage` (TP rank and EP rank
        alike: every split is even)."""
        dense = expert = tensors = 0
        for c in self.components:
            if c.place == FIRST and stage != 0 or c.place == LAST and stage != pp - 1:
                continue
            copies = self.num_layers // pp if c.place == LAYERS else 1
            numel = c.each // c.split * copies
            if c.expert:
                expert += numel
            else:
                dense += numel
            tensors += c.tensors * copies
        return dense, expert, tensors


def _norm(cfg: Config) -> int:
    return cfg.model.hidden_size * (2 if cfg.model.normalization == "LayerNorm" else 1)


def _ffn(cfg: Config, group: str, prefix: str, modality: Optional[str], tp: int, ep: int) -> List[Component]:
    m = cfg.model
    h, bias = m.hidden_size, m.add_bias_linear
    glu = 2 if m.activation == "swiglu" else 1
    f = m.ffn_hidden_size or default_ffn_hidden_size(h, m.activation)
    moe = m.moe.enabled and modality in m.moe.modalities
    if not moe:
        if f % tp:
            raise ValueError(f"model.ffn_hidden_size={f} is not divisible by parallel.tensor_model_parallel_size={tp}")
        out = [Component(group, f"{prefix}.linear_fc1.weight", glu * f * h, LAYERS, tp, modality=modality),
               Component(group, f"{prefix}.linear_fc2.weight", h * f, LAYERS, tp, modality=modality)]
        if bias:
            out += [Component(group, f"{prefix}.linear_fc1.bias", glu * f, LAYERS, tp, modality=modality),
                    Component(group, f"{prefix}.linear_fc2.bias", h, LAYERS, 1, modality=modality)]
        return out
    experts, fe = m.moe.num_experts, m.moe.ffn_hidden_size or f
    share = m.moe.router_topk / experts
    one = glu * fe * h + h * fe + ((glu * fe + h) if bias else 0)
    out = [Component(group, f"{prefix}.router.weight", experts * h, LAYERS, 1, modality=modality),
           Component(group, f"{prefix}.experts.local_experts.*", experts * one, LAYERS, ep,
                     tensors=(experts // ep) * (4 if bias else 2), expert=True, modality=modality, active=share)]
    fs = getattr(m.moe, "shared_expert_intermediate_size", None)
    if fs:  # megatron's SharedExpertMLP: a dense tensor-parallel MLP every token of the modality runs
        if fs % tp:
            raise ValueError(f"model.moe.shared_expert_intermediate_size={fs} is not divisible by "
                             f"parallel.tensor_model_parallel_size={tp}")
        out += [Component(group, f"{prefix}.shared_experts.linear_fc1.weight", glu * fs * h, LAYERS, tp,
                          modality=modality),
                Component(group, f"{prefix}.shared_experts.linear_fc2.weight", h * fs, LAYERS, tp,
                          modality=modality)]
        if bias:
            out += [Component(group, f"{prefix}.shared_experts.linear_fc1.bias", glu * fs, LAYERS, tp,
                              modality=modality),
                    Component(group, f"{prefix}.shared_experts.linear_fc2.bias", h, LAYERS, 1, modality=modality)]
    return out


def count_parameters(cfg: Config) -> ParameterCounts:
    """Analytic counts of the model cfg builds at cfg.parallel's tensor / expert-parallel sizes."""
    m, p = cfg.model, cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    h, bias, norm = m.hidden_size, m.add_bias_linear, _norm(cfg)
    head_dim = m.kv_channels or h // m.num_attention_heads
    a, g = m.num_attention_heads * head_dim, (m.num_query_groups or m.num_attention_heads) * head_dim
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    patch, t = m.patch_dim, m.timestep_embed_dim
    tied = m.share_embeddings_and_output_weights
    masked = cfg.objective.kind == "masked_diffusion"  # every token is discrete: one vocabulary, no latent I/O
    token = None if masked else "text"

    parts = [Component("embedding", "embedding.word_embeddings.weight", vocab * h, FIRST, tp, modality=token)]
    if not masked:
        parts += [Component("latent_io", "embedding.patch_embed", patch * h + h, FIRST, tensors=2, modality="image"),
                  Component("latent_io", "embedding.timestep_embed", t * h + h + h * h + h, FIRST, tensors=4,
                            modality="image")]
    attention = [(f"decoder.layers.*.{{}}.{name}", name) for name in MODALITIES] if m.modality_attention else [
        ("decoder.layers.*.{}", None)]
    for pattern, modality in attention:
        parts += [
            Component("norms", pattern.format("input_layernorm"), norm, LAYERS, tensors=norm // h,
                      modality=modality),
            Component("attention", pattern.format("self_attention.linear_qkv.weight"), (a + 2 * g) * h, LAYERS, tp,
                      modality=modality),
            Component("attention", pattern.format("self_attention.linear_proj.weight"), h * a, LAYERS, tp,
                      modality=modality),
            Component("norms", pattern.format("pre_mlp_layernorm"), norm, LAYERS, tensors=norm // h,
                      modality=modality),
        ]
        if bias:
            parts += [Component("attention", pattern.format("self_attention.linear_qkv.bias"), a + 2 * g, LAYERS, tp,
                                modality=modality),
                      Component("attention", pattern.format("self_attention.linear_proj.bias"), h, LAYERS, 1,
                                modality=modality)]
    if m.modality_ffn:
        for modality in modalities_of(cfg):
            parts += _ffn(cfg, f"ffn.{modality}", f"decoder.layers.*.mlp.{modality}", modality, tp, ep)
    else:
        parts += _ffn(cfg, "ffn", "decoder.layers.*.mlp", None, tp, ep)
    parts.append(Component("norms", "decoder.final_layernorm", norm, LAST, tensors=norm // h))
    if not tied or pp > 1:  # tied across stages: the last stage keeps a synchronised copy of the embedding
        parts.append(Component("lm_head", "output_layer.weight", vocab * h, LAST, tp, modality=token,
                               unique=not tied))
    if not masked:
        parts.append(Component("latent_io", "velocity_head.linear", h * patch + patch, LAST, tensors=2,
                               modality="image"))
    return ParameterCounts(parts, m.num_layers, vocab, modalities_of(cfg))
