"""MegafusionStateDictAdapter: megafusion (megatron, TP=1, EP=1) parameter names and layouts <-> Hugging Face ones.

One megatron tensor maps to one or more HF tensors (modeling_megafusion.py's names):

    embedding.word_embeddings.weight                          model.embed_tokens.weight
    embedding.patch_embed.* / embedding.timestep_embed.*      model.patch_embed.* / model.timestep_embed.*
    decoder.layers.N.input_layernorm.*                        model.layers.N.input_layernorm.*
    decoder.layers.N.self_attention.linear_qkv.{weight,bias}  model.layers.N.self_attn.{q,k,v}_proj.*  (split)
    decoder.layers.N.self_attention.linear_proj.*             model.layers.N.self_attn.o_proj.*
    decoder.layers.N.pre_mlp_layernorm.*                      model.layers.N.post_attention_layernorm.*
    decoder.layers.N.mlp[.M].linear_fc1.*                     model.layers.N.mlp[.M].{gate_proj,up_proj}.* (SwiGLU
                                                              split: megatron stacks [gate; up]) or .up_proj.*
    decoder.layers.N.mlp[.M].linear_fc2.*                     model.layers.N.mlp[.M].down_proj.*
    decoder.layers.N.mlp.M.router.*                           model.layers.N.mlp.M.router.*
    decoder.layers.N.mlp.M.experts.local_experts.E.linear_fc1/2.*   model.layers.N.mlp.M.experts.E.{...}  (as above)
    decoder.final_layernorm.*                                 model.norm.*
    (modality_attention) ...input_layernorm.M.* / pre_mlp_layernorm.M.*   ...input_layernorm.M.* / post_attention_layernorm.M.*
    (modality_attention) ...self_attention.linear_qkv.M.* / linear_proj.M.*   ...self_attn.M.{q,k,v,o}_proj.*
    output_layer.weight                                       lm_head.weight (absent when tied to the embedding)
    velocity_head.linear.*                                    velocity_head.*
    *._extra_state                                            nothing (skipped)

(M = text | image with modality FFNs.) megatron's fused QKV weight is [ng * (nq/ng + 2) * d, h], laid out per query
group as (nq/ng query heads, 1 key head, 1 value head); HF keeps q [nq * d, h] (head j in group j // (nq/ng)) and
k, v [ng * d, h]. Splitting and re-fusing are exact, so megafusion -> HF -> megafusion is bit-identical. The norm
names of megatron's sharded (dist-checkpoint) state dict, `self_attention.linear_qkv.layer_norm_*` and
`mlp.linear_fc1.layer_norm_*`, are accepted as aliases of input_layernorm / pre_mlp_layernorm.

The vocabulary is the TP=1 padding (padded_vocab_size(vocab, divisible_by, 1)); a converter targeting another
tensor-parallel size pads or trims rows itself. `hf_config_from_megafusion(cfg)` builds the HF config (and stores
cfg.model whole in `megafusion_model`); `model_overrides_from_hf(config)` gives back "model.X=value" overrides.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from megafusion.hf.configuration_megafusion import MegafusionConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.(text|image)\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")
# Mixture-of-Transformers (modality_attention): per-modality norms and attention projections
_ROUTED = re.compile(r"^(input_layernorm|pre_mlp_layernorm|self_attention\.linear_qkv|self_attention\.linear_proj)"
                     r"\.(text|image)\.(weight|bias)$")
_ROUTED_SLOTS = re.compile(r"^(input_layernorm|pre_mlp_layernorm|self_attention\.linear_qkv|self_attention\.linear_proj)"
                           r"\.(weight|bias)$")
_ALIASES = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
            "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "embedding.patch_embed.weight": "model.patch_embed.weight",
    "embedding.patch_embed.bias": "model.patch_embed.bias",
    "embedding.timestep_embed.linear_1.weight": "model.timestep_embed.linear_1.weight",
    "embedding.timestep_embed.linear_1.bias": "model.timestep_embed.linear_1.bias",
    "embedding.timestep_embed.linear_2.weight": "model.timestep_embed.linear_2.weight",
    "embedding.timestep_embed.linear_2.bias": "model.timestep_embed.linear_2.bias",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
    "velocity_head.linear.weight": "velocity_head.weight",
    "velocity_head.linear.bias": "velocity_head.bias",
}


def _insert_modality(name: str, prefix: str, modality: str) -> str:
    """model.layers.N.self_attn.q_proj.weight -> model.layers.N.self_attn.<modality>.q_proj.weight (and the norms)."""
    slot, tail = name[len(prefix):].split(".", 1)
    return f"{prefix}{slot}.{modality}.{tail}"


class MegafusionStateDictAdapter:
    def __init__(self, config: MegafusionConfig):
        if config.attention_bias != config.mlp_bias:
            raise ValueError(f"MegafusionConfig.attention_bias={config.attention_bias} and mlp_bias={config.mlp_bias} "
                             "differ; megatron has one switch (model.add_bias_linear) for both")
        self.config = config
        self.bias = config.attention_bias
        self.layernorm = config.norm_type == "layernorm"

    # ------------------------------------------------------------------ names
    def megatron_names(self) -> List[str]:
        """Every megatron (TP=1, EP=1) parameter of this config, in the model's state_dict order."""
        c, b = self.config, self.bias
        names = ["embedding.word_embeddings.weight", "embedding.patch_embed.weight", "embedding.patch_embed.bias"]
        for i in (1, 2):
            names += [f"embedding.timestep_embed.linear_{i}.weight", f"embedding.timestep_embed.linear_{i}.bias"]
        for n in range(c.num_hidden_layers):
            p = f"decoder.layers.{n}."
            for m in (".text", ".image") if c.modality_attention else ("",):
                names += self._norm(f"{p}input_layernorm{m}")
            for slot in ("linear_proj", "linear_qkv"):
                for m in (".text", ".image") if c.modality_attention else ("",):
                    names += self._linear(f"{p}self_attention.{slot}{m}", b)
            for m in (".text", ".image") if c.modality_attention else ("",):
                names += self._norm(f"{p}pre_mlp_layernorm{m}")
            if not c.modality_ffn:
                names += self._dense(p + "mlp")
            for modality in (("text", "image") if c.modality_ffn else ()):
                q = f"{p}mlp.{modality}"
                if c.uses_moe(modality):
                    names += self._linear(q + ".router", b)
                    for e in range(c.moe_num_experts):
                        names += self._dense(f"{q}.experts.local_experts.{e}")
                else:
                    names += self._dense(q)
        names += self._norm("decoder.final_layernorm")
        if not c.tie_word_embeddings:
            names.append("output_layer.weight")
        return names + ["velocity_head.linear.weight", "velocity_head.linear.bias"]

    def _norm(self, prefix: str) -> List[str]:
        return self._linear(prefix, self.layernorm)

    def _dense(self, prefix: str) -> List[str]:
        return self._linear(prefix + ".linear_fc1", self.bias) + self._linear(prefix + ".linear_fc2", self.bias)

    @staticmethod
    def _linear(prefix: str, bias: bool) -> List[str]:
        return [prefix + ".weight"] + ([prefix + ".bias"] if bias else [])

    def hf_names(self, megatron_name: str) -> List[str]:
        """The HF tensors `megatron_name` maps to: 3 for the fused QKV, 2 for a SwiGLU fc1, else 1; [] for
        `_extra_state`. A name this config does not have is a ValueError."""
        return [name for name, _ in self._plan(megatron_name)[1]]

    def _plan(self, megatron_name: str, shared_ok: bool = False
              ) -> Tuple[Tuple[int, ...], List[Tuple[str, Tuple[int, ...]]]]:
        """(megatron shape, [(HF name, HF shape), ...]) of one megatron tensor; HF pieces in fusion order.
        `shared_ok`: plan a shared attention / norm name under modality_attention (its per-modality pieces)."""
        c = self.config
        if megatron_name.endswith("._extra_state"):
            return (), []
        h, d, nq, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        if megatron_name in _GLOBAL:
            hf = _GLOBAL[megatron_name]
            shapes = {
                "model.embed_tokens.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h),
                "model.patch_embed.weight": (h, c.patch_dim), "model.patch_embed.bias": (h,),
                "model.timestep_embed.linear_1.weight": (h, c.timestep_embed_dim),
                "model.timestep_embed.linear_1.bias": (h,), "model.timestep_embed.linear_2.weight": (h, h),
                "model.timestep_embed.linear_2.bias": (h,), "model.norm.weight": (h,), "model.norm.bias": (h,),
                "velocity_head.weight": (c.patch_dim, h), "velocity_head.bias": (c.patch_dim,),
            }
            if hf == "model.norm.bias" and not self.layernorm:
                raise ValueError(f"{megatron_name}: the config has norm_type={c.norm_type!r}, whose norms have no bias")
            return shapes[hf], [(hf, shapes[hf])]
        match = _LAYER.match(megatron_name)
        if match is None:
            raise ValueError(f"{megatron_name!r} is not a megafusion parameter name")
        layer, rest = int(match.group(1)), match.group(2)
        for alias, canonical in _ALIASES.items():
            if rest.startswith(alias):
                rest = canonical + rest[len(alias):]
        if layer >= c.num_hidden_layers:
            raise ValueError(f"{megatron_name}: layer {layer} but the config has num_hidden_layers="
                             f"{c.num_hidden_layers}")
        prefix = f"model.layers.{layer}."
        routed = _ROUTED.match(rest)
        if routed or (c.modality_attention and not shared_ok and _ROUTED_SLOTS.match(rest)):
            if not (routed and c.modality_attention):
                raise ValueError(f"{megatron_name}: {'a per-modality' if routed else 'a shared'} attention or norm "
                                 f"parameter, but the config has modality_attention={c.modality_attention}")
            slot, modality, kind = routed.groups()
            shape, pieces = self._plan(f"decoder.layers.{layer}.{slot}.{kind}", shared_ok=True)
            return shape, [(_insert_modality(name, prefix, modality), piece) for name, piece in pieces]
        kind = rest.rsplit(".", 1)[-1]  # weight | bias
        if kind == "bias" and not rest.endswith("layernorm.bias") and not self.bias:
            raise ValueError(f"{megatron_name}: the config has no linear biases (attention_bias=mlp_bias=False)")
        if rest in ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                    "pre_mlp_layernorm.bias"):
            if kind == "bias" and not self.layernorm:
                raise ValueError(f"{megatron_name}: the config has norm_type={c.norm_type!r}, whose norms have no bias")
            hf = prefix + rest.replace("pre_mlp_layernorm", "post_attention_layernorm")
            return (h,), [(hf, (h,))]
        if rest.startswith("self_attention.linear_qkv."):
            q, kv = (nq * d, h), (nkv * d, h)
            if kind == "bias":
                q, kv = q[:1], kv[:1]
            names = [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
            return ((nq + 2 * nkv) * d,) + q[1:], list(zip(names, (q, kv, kv)))
        if rest.startswith("self_attention.linear_proj."):
            shape = (h, nq * d) if kind == "weight" else (h,)
            return shape, [(f"{prefix}self_attn.o_proj.{kind}", shape)]
        return self._plan_mlp(megatron_name, prefix, rest, kind)

    def _plan_mlp(self, megatron_name: str, prefix: str, rest: str, kind: str):
        c, h = self.config, self.config.hidden_size
        modality = None
        match = re.match(r"^mlp\.(text|image)\.(.+)$", rest)
        if match:
            modality, tail = match.groups()
            if not c.modality_ffn:
                raise ValueError(f"{megatron_name}: a modality FFN parameter, but the config has modality_ffn=False")
        elif rest.startswith("mlp."):
            if c.modality_ffn:
                raise ValueError(f"{megatron_name}: a shared FFN parameter, but the config has modality_ffn=True")
            tail = rest[len("mlp."):]
        else:
            raise ValueError(f"{megatron_name!r} is not a megafusion parameter name")
        hf_mlp = prefix + "mlp." + (f"{modality}." if modality else "")
        moe = modality is not None and c.uses_moe(modality)
        if tail.startswith("router."):
            if not moe:
                raise ValueError(f"{megatron_name}: a router, but the config has no experts for {modality!r}")
            shape = (c.moe_num_experts, h) if kind == "weight" else (c.moe_num_experts,)
            return shape, [(f"{hf_mlp}router.{kind}", shape)]
        width = c.intermediate_size
        expert = _EXPERT.match(rest)
        if expert:
            e = int(expert.group(2))
            if not moe or e >= c.moe_num_experts:
                raise ValueError(f"{megatron_name}: expert {e}, but the config has moe_num_experts="
                                 f"{c.moe_num_experts} for modalities {c.moe_modalities}")
            hf_mlp, tail, width = f"{hf_mlp}experts.{e}.", f"{expert.group(3)}.{kind}", c.moe_intermediate_size
        elif moe:
            raise ValueError(f"{megatron_name}: a dense FFN parameter, but {modality!r} FFNs are experts")
        if tail == f"linear_fc1.{kind}":
            piece = (width, h) if kind == "weight" else (width,)
            names = ["gate_proj", "up_proj"] if c.gated_mlp else ["up_proj"]
            fused = (piece[0] * len(names),) + piece[1:]
            return fused, [(f"{hf_mlp}{n}.{kind}", piece) for n in names]
        if tail == f"linear_fc2.{kind}":
            shape = (h, width) if kind == "weight" else (h,)
            return shape, [(f"{hf_mlp}down_proj.{kind}", shape)]
        raise ValueError(f"{megatron_name!r} is not a megafusion parameter name")

    # ------------------------------------------------------------------ tensors
    def to_hf(self, megatron_name: str, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One megatron tensor -> its HF tensors (split pieces are fresh tensors, safe to save side by side)."""
        shape, pieces = self._plan(megatron_name)
        if not pieces:
            return {}
        _check_shape(megatron_name, tensor, shape)
        if len(pieces) == 1:
            return {pieces[0][0]: tensor}
        if ".linear_qkv." in megatron_name:
            parts = self._split_qkv(tensor)
        else:
            parts = torch.chunk(tensor, len(pieces), dim=0)
        return {name: part.clone() for (name, _), part in zip(pieces, parts)}

    def from_hf(self, megatron_name: str, hf_tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The megatron tensor `megatron_name` from HF tensors (a mapping holding at least hf_names(megatron_name))."""
        shape, pieces = self._plan(megatron_name)
        if not pieces:
            raise ValueError(f"{megatron_name}: megatron extra state has no HF counterpart")
        missing = [name for name, _ in pieces if name not in hf_tensors]
        if missing:
            raise ValueError(f"{megatron_name} needs HF tensors {missing}, which are missing")
        for name, piece_shape in pieces:
            _check_shape(name, hf_tensors[name], piece_shape)
        if len(pieces) == 1:
            return hf_tensors[pieces[0][0]]
        parts = [hf_tensors[name] for name, _ in pieces]
        if ".linear_qkv." in megatron_name:
            return self._fuse_qkv(*parts)
        return torch.cat(parts, dim=0)

    def _split_qkv(self, fused: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        ng, per, d = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
        grouped = fused.reshape(ng, (per + 2) * d, *fused.shape[1:])
        q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
        return tuple(x.reshape(-1, *fused.shape[1:]) for x in (q, k, v))

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.config
        ng, tail = c.num_key_value_heads, q.shape[1:]
        grouped = [x.reshape(ng, -1, *tail) for x in (q, k, v)]
        return torch.cat(grouped, dim=1).reshape(-1, *tail)

    # ------------------------------------------------------------------ whole state dicts
    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A megatron state dict (TP=1) -> HF; raises listing missing and unexpected megatron names."""
        present = {name for name in sd if not name.endswith("._extra_state")}
        expected = self.megatron_names()
        _raise_mismatch("megatron", sorted(set(expected) - present), sorted(present - set(expected)))
        out: Dict[str, torch.Tensor] = {}
        for name in expected:
            out.update(self.to_hf(name, sd[name]))
        return out

    def from_hf_state_dict(self, sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """An HF state dict -> megatron (TP=1, no `_extra_state`); raises listing missing and unexpected HF names.
        With tied embeddings an `lm_head.weight` equal to the embedding (HF's state_dict() lists it) is ignored."""
        names = self.megatron_names()
        expected = [hf for name in names for hf in self.hf_names(name)]
        present = set(sd)
        if self.config.tie_word_embeddings and "lm_head.weight" in present:
            embed = sd.get("model.embed_tokens.weight")
            if embed is None or not torch.equal(sd["lm_head.weight"], embed):
                raise ValueError("lm_head.weight differs from model.embed_tokens.weight but the config ties them "
                                 "(tie_word_embeddings=True)")
            present.discard("lm_head.weight")
        _raise_mismatch("HF", sorted(set(expected) - present), sorted(present - set(expected)))
        return {name: self.from_hf(name, sd) for name in names}


def _check_shape(name: str, tensor: torch.Tensor, expected: Tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the config expects {tuple(expected)}")


def _raise_mismatch(kind: str, missing: List[str], unexpected: List[str]) -> None:
    if missing or unexpected:
        raise ValueError(f"{kind} state dict does not match the config: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------------------------------------- configs
def hf_config_from_megafusion(cfg) -> MegafusionConfig:
    """MegafusionConfig of a megafusion Config (its `model` section; a ModelConfig is accepted too). The padded
    vocabulary is the TP=1 one; the whole model section is kept in `megafusion_model`."""
    from megafusion.data.special_tokens import SPECIAL_TOKENS
    from megafusion.model.transformer_config import default_ffn_hidden_size, padded_vocab_size

    m = getattr(cfg, "model", cfg)
    if m.moe.enabled:
        unsupported = {"shared_expert_intermediate_size": m.moe.shared_expert_intermediate_size is not None,
                       "expert_capacity_factor": m.moe.expert_capacity_factor is not None,
                       "router_score_function": m.moe.router_score_function != "softmax",
                       "router_enable_expert_bias": m.moe.router_enable_expert_bias}
        named = [f"model.moe.{k}" for k, v in unsupported.items() if v]
        if named:
            raise ValueError(f"the Hugging Face model does not implement {', '.join(named)} yet (shared experts, "
                             "capacity dropping, sigmoid scores and expert biases change what the model computes); "
                             "this checkpoint cannot be exported")
    swiglu = m.activation == "swiglu"
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation)
    moe = m.moe
    return MegafusionConfig(
        vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
        text_vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        intermediate_size=ffn,
        hidden_act="silu" if swiglu else "gelu",
        gated_mlp=swiglu,
        norm_type=m.normalization.lower(),
        norm_eps=m.layernorm_epsilon,
        attention_bias=m.add_bias_linear,
        mlp_bias=m.add_bias_linear,
        rope_theta=float(m.rotary_base),
        initializer_range=m.init_method_std,
        tie_word_embeddings=m.share_embeddings_and_output_weights,
        latent_channels=m.latent_channels,
        latent_size=m.latent_size,
        patch_size=m.patch_size,
        timestep_embed_dim=m.timestep_embed_dim,
        patch_position_embedding=m.patch_position_embedding,
        modality_ffn=m.modality_ffn,
        modality_attention=m.modality_attention,
        hide_noised_latents=m.hide_noised_latents,
        moe_num_experts=moe.num_experts or 0,
        moe_modalities=list(moe.modalities),
        moe_topk=moe.router_topk,
        moe_intermediate_size=moe.ffn_hidden_size or ffn,
        moe_pre_softmax=moe.router_topk == 1,
        pad_token_id=SPECIAL_TOKENS.pad,
        bos_token_id=SPECIAL_TOKENS.bos,
        eos_token_id=SPECIAL_TOKENS.eos,
        boi_token_id=SPECIAL_TOKENS.boi,
        eoi_token_id=SPECIAL_TOKENS.eoi,
        megafusion_model=json.loads(json.dumps(dataclasses.asdict(m))),  # plain: tuples -> lists
    )


def model_overrides_from_hf(config: MegafusionConfig) -> List[str]:
    """"model.X=value" dotlist overrides that rebuild the megafusion model section: `megafusion_model` verbatim when
    the config carries it, else derived from the HF fields (runtime choices such as the attention backend keep
    their defaults)."""
    section = config.megafusion_model if getattr(config, "megafusion_model", None) else _model_section(config)
    return _dotlist("model", section)


def _model_section(c: MegafusionConfig) -> dict:
    from megafusion.model.transformer_config import padded_vocab_size

    if c.attention_bias != c.mlp_bias:
        raise ValueError(f"MegafusionConfig.attention_bias={c.attention_bias} and mlp_bias={c.mlp_bias} differ; "
                         "megafusion has one switch (model.add_bias_linear)")
    rotary = int(c.rope_theta)
    if rotary != c.rope_theta:
        raise ValueError(f"MegafusionConfig.rope_theta={c.rope_theta} is not an integer (model.rotary_base is one)")
    divisible = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1, c.vocab_size)
                     if padded_vocab_size(c.text_vocab_size, d, 1) == c.vocab_size)
    section = dict(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads, ffn_hidden_size=c.intermediate_size, kv_channels=c.head_dim,
        vocab_size=c.text_vocab_size, make_vocab_size_divisible_by=divisible,
        normalization={"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[c.norm_type],
        activation="swiglu" if c.gated_mlp else "gelu", add_bias_linear=c.attention_bias,
        layernorm_epsilon=c.norm_eps, init_method_std=c.initializer_range, rotary_base=rotary,
        share_embeddings_and_output_weights=c.tie_word_embeddings, latent_channels=c.latent_channels,
        latent_size=c.latent_size, patch_size=c.patch_size, modality_ffn=c.modality_ffn,
        modality_attention=c.modality_attention,
        timestep_embed_dim=c.timestep_embed_dim, patch_position_embedding=c.patch_position_embedding,
        hide_noised_latents=c.hide_noised_latents,
    )
    if c.moe_enabled:
        if c.moe_pre_softmax != (c.moe_topk == 1):
            raise ValueError(f"MegafusionConfig.moe_pre_softmax={c.moe_pre_softmax} with moe_topk={c.moe_topk}: "
                             "megafusion always takes the softmax before the top-k exactly when top-k is 1")
        section["moe"] = dict(num_experts=c.moe_num_experts, modalities=list(c.moe_modalities),
                              router_topk=c.moe_topk, ffn_hidden_size=c.moe_intermediate_size)
    return section


def _dotlist(prefix: str, section: Mapping) -> List[str]:
    out: List[str] = []
    for key, value in section.items():
        if isinstance(value, Mapping):
            out += _dotlist(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={_format(value)}")
    return out


def _format(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


__all__ = ["MegafusionStateDictAdapter", "hf_config_from_megafusion", "model_overrides_from_hf"]
