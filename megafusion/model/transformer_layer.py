"""Megatron's attention / layer / block, made to carry the AttentionLayout everywhere it is needed.

megafusion passes one AttentionLayout per batch through megatron's `attention_mask` argument. Three places need
more than megatron gives them:

- MultimodalTransformerLayer: megatron's TransformerLayer.forward hands `padding_mask` to the MLP (directly and
  through its MLP recompute, a functools.partial closure) but never the attention mask. This layer passes the
  layout in that channel when the MLP is a ModalityMLP (which routes rows by modality); any other MLP (plain, MoE)
  gets megatron's own meaning, a [b, s] bool padding mask derived from the layout.
- MultimodalSelfAttention: selective recompute of core attention (`training.recompute=selective`) passes the mask
  through megatron's CheckpointFunction, which can only save tensors; here the layout stays in the closure.
- MultimodalTransformerBlock: full recompute (`training.recompute=full`) does the same for whole layers.
- With model.modality_attention the layer also hands the layout to its per-modality norms and projections for
  the duration of its forward (megafusion/model/modality_attention.py).

On GPU with Transformer Engine and on CPU the same classes run; nothing here touches devices.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext
from typing import Optional

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.modality_attention import routed
from megafusion.model.modality_mlp import ModalityMLP


class MultimodalSelfAttention(SelfAttention):
    def _checkpointed_attention_forward(
        self,
        query,
        key,
        value,
        attention_mask,
        rotary_pos_emb=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """Selective recompute of core attention with the (non-tensor) layout kept out of the checkpoint args."""
        if not isinstance(attention_mask, AttentionLayout):
            return super()._checkpointed_attention_forward(
                query, key, value, attention_mask, rotary_pos_emb, attn_mask_type, attention_bias, packed_seq_params
            )
        layout = attention_mask
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type

        def core(q, k, v):
            return self.core_attention(
                q, k, v, layout, attn_mask_type=mask_type, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )

        return tensor_parallel.checkpoint(core, False, query, key, value)


@contextmanager
def _quiet_unknown_mlp_warning():
    """TransformerLayer logs 'Unknown MLP type' for any MLP class it does not know (ModalityMLP included)."""
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    previous = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(previous)


class MultimodalTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout: Optional[float] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, vp_stage: Optional[int] = None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        mlp = submodules.mlp
        modality_mlp = isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(
            mlp.module, ModalityMLP)
        if modality_mlp:  # hand it the layer's process groups, like TransformerLayer does for MLP / MoE
            mlp = ModuleSpec(module=mlp.module, params={**mlp.params, "pg_collection": pg_collection},
                             submodules=mlp.submodules)
            submodules = dataclasses.replace(submodules, mlp=mlp)
        with _quiet_unknown_mlp_warning() if modality_mlp else nullcontext():
            super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                             hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)

    def forward(self, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        layout = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        attention = self.self_attention
        with routed((self.input_layernorm, self.pre_mlp_layernorm, attention.linear_qkv, attention.linear_proj),
                    layout):  # Mixture-of-Transformers modules route rows by modality (modality_attention.py)
            hidden_states, context = self._forward_attention(*args, **kwargs)
            output = self._forward_mlp(
                hidden_states,
                kwargs.get("inference_context", None),
                padding_mask=self._mlp_routing(layout, kwargs.get("padding_mask", None)),
            )
        return output, context

    def _mlp_routing(self, layout, padding_mask):
        """What the MLP receives as `padding_mask`: the layout for a ModalityMLP, else a [b, s] padding mask."""
        if isinstance(self.mlp, ModalityMLP):
            return layout
        if padding_mask is None and isinstance(layout, AttentionLayout):
            if not self.config.sequence_parallel:
                return layout.cached("padding_mask", lambda: ~layout.valid)
            # this rank's slice of the sequence, as megatron's GPTModel scatters its padding mask
            def local_slice():
                mask = (~layout.valid).transpose(0, 1).contiguous()  # [s, b]
                mask = tensor_parallel.scatter_to_sequence_parallel_region(mask, group=self.tp_group)
                return mask.transpose(0, 1).contiguous()

            return layout.cached("padding_mask_sequence_parallel", local_slice)
        return padding_mask


class MultimodalTransformerBlock(TransformerBlock):
    def _checkpointed_forward(
        self,
        hidden_states,
        attention_mask,
        context,
        context_mask,
        rotary_pos_emb,
        attention_bias,
        packed_seq_params,
        use_inner_quantization_context: bool,
        padding_mask=None,
    ):
        """Full recompute (uniform or block method) with the layout captured by closure, not saved as an arg."""
        if not isinstance(attention_mask, AttentionLayout):
            return super()._checkpointed_forward(
                hidden_states, attention_mask, context, context_mask, rotary_pos_emb, attention_bias,
                packed_seq_params, use_inner_quantization_context, padding_mask,
            )
        layout = attention_mask
        config = self.config
        quantized = bool(config.fp8 or config.fp4)

        def chunk(start: int, end: int):
            def run(hidden_states, context, context_mask, rotary_pos_emb):
                for index in range(start, end):
                    layer = self._get_layer(index)
                    with self._inner_quantization_context(layer, use_inner_quantization_context):
                        hidden_states, context = layer(
                            hidden_states=hidden_states,
                            attention_mask=layout,
                            context=context,
                            context_mask=context_mask,
                            rotary_pos_emb=rotary_pos_emb,
                            attention_bias=attention_bias,
                            inference_context=None,
                            packed_seq_params=packed_seq_params,
                            padding_mask=padding_mask,
                        )
                return hidden_states, context

            return run

        def checkpointed(fn, hidden_states, context):
            args = (hidden_states, context, context_mask, rotary_pos_emb)
            if quantized:
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(fn, config.distribute_saved_activations,
                                     tensor_parallel.random.get_cuda_rng_tracker, self.pg_collection.tp, *args)
            return tensor_parallel.checkpoint(fn, config.distribute_saved_activations, *args)

        n = self.num_layers_per_pipeline_rank
        if config.recompute_method == "uniform":
            for start in range(0, n, config.recompute_num_layers):
                end = min(start + config.recompute_num_layers, n)
                hidden_states, context = checkpointed(chunk(start, end), hidden_states, context)
        elif config.recompute_method == "block":
            skipped = 0
            for index in range(n):
                if quantized and not hidden_states.requires_grad:
                    skipped += 1
                if skipped <= index < config.recompute_num_layers + skipped:
                    hidden_states, context = checkpointed(chunk(index, index + 1), hidden_states, context)
                else:
                    hidden_states, context = chunk(index, index + 1)(hidden_states, context, context_mask,
                                                                     rotary_pos_emb)
        else:
            raise ValueError(
                f"recompute_method={config.recompute_method!r}: full recompute needs 'uniform' or 'block' "
                "(megafusion sets uniform for training.recompute=full)"
            )
        return hidden_states

    def _inner_quantization_context(self, layer, use_inner: bool):
        if not use_inner:
            return nullcontext()
        if self.config.fp8:
            from megatron.core.fp8_utils import get_fp8_context

            return get_fp8_context(self.config, layer.layer_number - 1)
        if self.config.fp4:
            from megatron.core.fp4_utils import get_fp4_context

            return get_fp4_context(self.config, layer.layer_number - 1)
        return nullcontext()


__all__ = ["MultimodalSelfAttention", "MultimodalTransformerLayer", "MultimodalTransformerBlock"]
