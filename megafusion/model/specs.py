"""Layer specs of the multimodal transformer: megatron ModuleSpecs, local (torch) or Transformer Engine.

`get_layer_spec(config, use_te)` follows megatron's get_gpt_layer_local_spec /
get_gpt_layer_with_transformer_engine_spec, with these changes:

- the layer is MultimodalTransformerLayer and the attention MultimodalSelfAttention (they carry the AttentionLayout
  to the FFN and through recompute; megafusion/model/transformer_layer.py);
- core attention is HybridCoreAttention (causal text, bidirectional visual blocks; megafusion/model/attention);
- with `config.modality_attention` (BAGEL's Mixture-of-Transformers), the input and pre-FFN norms and the QKV and
  output projections are per modality (ModalityNorm / ModalityLinear, megafusion/model/modality_attention.py),
  unfused also under Transformer Engine; the attention itself stays one;
- with `config.modality_ffn`, the MLP slot is a ModalityMLP holding one FFN spec per modality. The pre-FFN norm
  stays shared unless modality_attention is on (one `pre_mlp_layernorm`, also with TE, where it is a TENorm before
  a plain TE column-parallel fc1),
  so local and TE checkpoints keep the same parameter names. A modality listed in `config.moe_modalities`
  (model.moe) gets megatron's MoE layer (megafusion/model/moe.py), the others a dense MLP;
  `get_modality_mlp_spec(..., image=<spec>)` lets a caller put any other spec in a modality's slot.

`get_block_spec` pairs the layers with a final norm of the same implementation (megatron's default block picks
TENorm / apex / torch by what happens to be installed, whatever the layers use). Local norms are LocalNorm
(megafusion/model/norm.py), which also works under sequence parallelism.

Transformer Engine modules are imported only when `use_te` is True.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megafusion.model.inference_linear import InferenceColumnParallelLinear, InferenceRowParallelLinear
from megafusion.model.attention.core_attention import HybridCoreAttention
from megafusion.model.modality_attention import ModalityLinear, ModalityNorm
from megafusion.model.modality_mlp import ModalityMLP, ModalityMLPSubmodules
from megafusion.model.moe import get_moe_spec
from megafusion.model.norm import LocalNorm
from megafusion.model.transformer_layer import MultimodalSelfAttention, MultimodalTransformerLayer


def _subclass_of(megatron_cls, ours):
    """`ours` where megatron's spec provider names the class it subclasses (else megatron's own, unchanged)."""
    return ours if issubclass(ours, megatron_cls) else megatron_cls


class _Backend:
    """The modules of one implementation (local torch layers, or Transformer Engine)."""

    def __init__(self, config, use_te: bool):
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"model.normalization={config.normalization!r}: use RMSNorm or LayerNorm")
        self.use_te = use_te
        if use_te:
            try:
                from megatron.core.extensions.transformer_engine import (
                    TEColumnParallelLinear,
                    TELayerNormColumnParallelLinear,
                    TENorm,
                    TERowParallelLinear,
                )
            except ImportError as error:  # pragma: no cover - depends on the machine
                raise ImportError(
                    "model.transformer_impl=transformer_engine needs transformer-engine "
                    "(pip install transformer-engine[pytorch] on a CUDA machine); use model.transformer_impl=local "
                    "instead"
                ) from error
            if TENorm is None or TELayerNormColumnParallelLinear is None:
                raise ImportError("transformer-engine did not import; use model.transformer_impl=local")
            self.norm = TENorm
            self.column = TEColumnParallelLinear
            self.norm_column = TELayerNormColumnParallelLinear
            self.row = TERowParallelLinear
        else:
            local = LocalSpecProvider()
            self.norm = LocalNorm
            # megatron's local linears with a generation fast path (megafusion/model/inference_linear.py)
            self.column = _subclass_of(local.column_parallel_linear(), InferenceColumnParallelLinear)
            self.norm_column = None
            self.row = _subclass_of(local.row_parallel_linear(), InferenceRowParallelLinear)


def get_mlp_spec(config, use_te: bool, fuse_norm: bool = False) -> ModuleSpec:
    """A dense megatron MLP (SwiGLU or GELU from config). `fuse_norm` (TE only): fc1 carries the pre-FFN norm."""
    backend = _Backend(config, use_te)
    fc1 = backend.norm_column if (use_te and fuse_norm) else backend.column
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=backend.row))


def get_ffn_spec(config, use_te: bool, modality: str) -> ModuleSpec:
    """The FFN of one modality's slot: megatron's MoE layer if config.moe_modalities names it, else a dense MLP
    without a fused norm."""
    if modality in getattr(config, "moe_modalities", ()):
        return get_moe_spec(config, use_te, modality)
    return get_mlp_spec(config, use_te)


def get_modality_mlp_spec(config, use_te: bool, text: Optional[ModuleSpec] = None,
                          image: Optional[ModuleSpec] = None) -> ModuleSpec:
    """ModalityMLP with one FFN per modality of config.ffn_modalities; each defaults to get_ffn_spec's (dense or
    MoE, from config)."""
    audio = None
    if "audio" in getattr(config, "ffn_modalities", ()):
        audio = get_ffn_spec(config, use_te, "audio")
    return ModuleSpec(
        module=ModalityMLP,
        submodules=ModalityMLPSubmodules(
            text=text if text is not None else get_ffn_spec(config, use_te, "text"),
            image=image if image is not None else get_ffn_spec(config, use_te, "image"),
            audio=audio,
        ),
    )


def get_layer_spec(config, use_te: bool, mlp: Optional[ModuleSpec] = None) -> ModuleSpec:
    """ModuleSpec of one MultimodalTransformerLayer. `mlp` overrides the FFN slot (default from config)."""
    backend = _Backend(config, use_te)
    modality = bool(getattr(config, "modality_ffn", False))
    if mlp is None:
        fuse = not getattr(config, "modality_attention", False)  # per-modality pre-FFN norms cannot fuse into fc1
        mlp = get_modality_mlp_spec(config, use_te) if modality else get_mlp_spec(config, use_te, fuse_norm=fuse)
    fused_mlp_norm = use_te and isinstance(mlp, ModuleSpec) and mlp.module is MLP and (
        mlp.submodules.linear_fc1 is backend.norm_column)

    pre_mlp_layernorm = IdentityOp if fused_mlp_norm else backend.norm
    linear_proj = backend.row
    if getattr(config, "modality_attention", False):
        # Mixture-of-Transformers: unfused per-modality norms and projections (megafusion/model/modality_attention.py)
        input_layernorm = ModuleSpec(module=ModalityNorm, submodules=backend.norm)
        linear_qkv = ModuleSpec(module=ModalityLinear, submodules=backend.column)
        linear_proj = ModuleSpec(module=ModalityLinear, submodules=backend.row)
        if fused_mlp_norm:
            raise ValueError("model.modality_attention needs an unfused pre-FFN norm; build the layer with "
                             "get_layer_spec's default FFN")
        pre_mlp_layernorm = ModuleSpec(module=ModalityNorm, submodules=backend.norm)
        keys_map = {}
    elif use_te:
        input_layernorm = IdentityOp
        linear_qkv = backend.norm_column
        keys_map = {}
    else:
        input_layernorm = backend.norm
        linear_qkv = backend.column
        # local checkpoints use TE's names for the norms fused into TE linears (as megatron's local GPT spec)
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        if mlp.module is MLP:
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"

    return ModuleSpec(
        module=MultimodalTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_layernorm,
            self_attention=ModuleSpec(
                module=MultimodalSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=HybridCoreAttention,
                    linear_proj=linear_proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_layernorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def get_block_spec(config, use_te: bool, layer_spec: ModuleSpec, num_layers: int) -> TransformerBlockSubmodules:
    """`num_layers` layers of `layer_spec`, then the final norm from the same backend as the layers."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=_Backend(config, use_te).norm)
