"""MultimodalModel: embed a packed Batch -> megatron TransformerBlock (hybrid attention, modality FFN) -> heads.

A megatron LanguageModule (so embedding/output tying, sharded_state_dict for dist_checkpointing and pipeline
plumbing are megatron's). Parameter names follow GPTModel: embedding.word_embeddings, decoder.layers.*,
decoder.final_layernorm, output_layer; plus embedding.patch_embed, embedding.timestep_embed and velocity_head.

forward(batch, layout=None, inference_context=None):
    layout = AttentionLayout.from_batch(batch, config.hide_noised_latents)   (once per micro-batch)
    pre_process stage:  hidden = embedding(batch)  [s, b, h];  other stages take megatron's set_input_tensor
    hidden = decoder(hidden, attention_mask=layout, rotary_pos_emb=RoPE(0..s-1))   [s, b, h]
    post_process stage: ModelOutput(logits [s, b, V_padded/tp], velocity [N, patch_dim]); others: hidden
Generation passes its state as `inference_context` (megafusion.inference.kv_cache.InferenceStep, the counterpart
of megatron GPTModel's inference_context): the batch then holds only the new positions, RoPE angles come from
the context's per-row `positions` (their cos / sin are computed once per forward and applied by the core
attention, with megatron's own arithmetic), attention reads and writes its KV cache (through the layout), and logits are
computed only at the context's `logit_positions` (one per row; None = no logits, e.g. a denoising step).
Under sequence parallelism (config.sequence_parallel, TP > 1) hidden states between the embedding and the heads
are this rank's slice [s/tp, b, h]: the embedding scatters, megatron's linears gather / reduce-scatter around
attention, ModalityMLP gathers to route rows by modality, and both heads gather.
Every pipeline stage receives the same Batch; its metadata (modality, blocks, documents) is small.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.utils import get_pg_rank

from megafusion.data.batch import Batch
from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.embeddings import MultimodalEmbedding
from megafusion.model.heads import VelocityHead, build_lm_head
from megafusion.model.output import ModelOutput
from megafusion.model.specs import get_block_spec, get_layer_spec
from megafusion.model.transformer_config import MultimodalTransformerConfig, build_transformer_config
from megafusion.model.transformer_layer import MultimodalTransformerBlock


class MultimodalModel(LanguageModule):
    def __init__(
        self,
        config: MultimodalTransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        layer_spec: Optional[ModuleSpec] = None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        if not isinstance(config, MultimodalTransformerConfig):
            raise TypeError("MultimodalModel needs a MultimodalTransformerConfig (build_transformer_config(cfg))")
        if config.vocab_size <= 0:
            raise ValueError("MultimodalTransformerConfig.vocab_size must be set (model.vocab_size)")
        if config.context_parallel_size != 1:
            raise ValueError("MultimodalModel does not support context parallelism yet; set context_parallel_size=1")
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.vocab_size = config.padded_vocab_size
        use_te = config.transformer_impl == "transformer_engine"
        self.transformer_layer_spec = layer_spec if layer_spec is not None else get_layer_spec(config, use_te)

        if pre_process:
            self.embedding = MultimodalEmbedding(config, self.vocab_size, tp_group=self.pg_collection.tp)
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )
        self._rope_cache = {}
        num_layers = get_num_layers_to_build(config, vp_stage, get_pg_rank(self.pg_collection.pp))
        self.decoder = MultimodalTransformerBlock(
            config=config,
            spec=get_block_spec(config, use_te, self.transformer_layer_spec, num_layers),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = build_lm_head(
                config, self.vocab_size, skip_weight=pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp,
            )
            if getattr(config, "latent_io", True):
                self.velocity_head = VelocityHead(config, tp_group=self.pg_collection.tp)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor: Union[torch.Tensor, List[torch.Tensor]]) -> None:
        """Pipeline stages after the first get their input hidden states [s, b, h] here (megatron schedules)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        if len(input_tensor) != 1:
            raise ValueError(f"MultimodalModel takes one input tensor per stage, got {len(input_tensor)}")
        self.decoder.set_input_tensor(input_tensor[0])

    def build_layout(self, batch: Batch) -> AttentionLayout:
        return AttentionLayout.from_batch(batch, self.config.hide_noised_latents)

    def forward(self, batch: Batch, layout: Optional[AttentionLayout] = None,
                inference_context=None) -> Union[ModelOutput, torch.Tensor]:
        if layout is None:
            layout = self.build_layout(batch)
        if inference_context is not None:
            if self.config.sequence_parallel:
                raise ValueError("generation runs without sequence parallelism; build the model with "
                                 "parallel.sequence_parallel=false")
            layout.inference = inference_context
            # RoPE is applied by the core attention from cos / sin computed once here, not by megatron's
            # SelfAttention in every layer (two cos and two sin per layer: a decode step's largest overhead)
            angles = self._rotary_at(inference_context.positions, layout.device)
            inference_context.rope = (torch.cos(angles), torch.sin(angles), self.config.rotary_interleaved)
            rotary_pos_emb = None
        else:
            rotary_pos_emb = self._rotary_embedding(batch.seq_length, layout.device)
        decoder_input = self.embedding(batch, layout) if self.pre_process else None
        hidden_states = self.decoder(hidden_states=decoder_input, attention_mask=layout, rotary_pos_emb=rotary_pos_emb)
        if not self.post_process:
            return hidden_states  # [s, b, h]
        velocity = self.velocity_head(hidden_states, layout) if hasattr(self, "velocity_head") else None
        if inference_context is not None:
            positions = inference_context.logit_positions
            if positions is None:
                return ModelOutput(logits=None, velocity=velocity)
            rows = torch.arange(hidden_states.shape[1], device=hidden_states.device)
            hidden_states = hidden_states[positions.to(hidden_states.device), rows].unsqueeze(0)  # [1, b, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight)  # [s, b, V_padded / tp]
        return ModelOutput(logits=logits, velocity=velocity)

    def _rotary_at(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """RoPE angles [n, b, 1, d] of per-row positions [b, n]: rows of the same table `_rotary_embedding` builds,
        so a position gets bitwise the angles it gets in a full-sequence forward."""
        top = int(positions.max().item()) + 1 if positions.numel() else 1
        size = 1 << max(top - 1, 1).bit_length()  # a few table sizes, cached
        table = self._rotary_embedding(size, device)[:, 0, 0, :]  # [size, d]
        return table[positions.to(device).transpose(0, 1)].unsqueeze(2)

    def _rotary_embedding(self, seq_length: int, device: torch.device) -> torch.Tensor:
        """RoPE angles [s, 1, 1, d] of positions 0..s-1, cached per (length, device).

        On GPU this is megatron's RotaryEmbedding.forward. Its get_emb moves inv_freq to torch.cuda.current_device(),
        so on CPU the same angles are built from its get_freqs_non_repeated (the layout get_emb gives them)."""
        key = (seq_length, str(device))
        emb = self._rope_cache.get(key)
        if emb is None:
            with torch.inference_mode(False):  # a table built during generation must serve training too
                emb = self._build_rotary_table(seq_length, device)
            self._rope_cache[key] = emb
        return emb

    def _build_rotary_table(self, seq_length: int, device: torch.device) -> torch.Tensor:
        rope = self.rotary_pos_emb
        if device.type == "cuda":
            return rope(seq_length).to(device)
        freqs = rope.get_freqs_non_repeated(seq_length)  # [s, d/2]
        if rope.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(seq_length, -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :].to(device)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """LanguageModule's (handles embedding/output tying) without the output layer's empty extra state."""
        sharded_state_dict = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        extra = sharded_state_dict.pop(f"{prefix}output_layer._extra_state", None)
        if extra is not None and getattr(extra, "data", None):
            raise ValueError(f"MultimodalModel: unexpected non-empty output_layer extra state {extra}")
        return sharded_state_dict


def model_provider(
    cfg_or_config, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
) -> MultimodalModel:
    """Build the model from the megafusion Config tree or a MultimodalTransformerConfig (megatron's
    model_provider(pre_process, post_process, vp_stage) convention; bind cfg with functools.partial)."""
    config = (cfg_or_config if isinstance(cfg_or_config, MultimodalTransformerConfig)
              else build_transformer_config(cfg_or_config))
    return MultimodalModel(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                           pg_collection=pg_collection)
