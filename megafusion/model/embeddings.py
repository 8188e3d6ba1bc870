"""MultimodalEmbedding: a packed Batch -> the transformer's input hidden states [s, b, h].

- text positions: megatron's VocabParallelEmbedding over the padded vocabulary (config.padded_vocab_size:
  vocab_size rounded up to make_vocab_size_divisible_by * TP), as in megatron's LanguageModelEmbedding;
- latent positions: a linear patch embedding patch_dim -> h of Batch.noisy_latents, written over the placeholder
  token's embedding; at noised positions (Batch.noised) a flow-time embedding of Batch.latent_t is added
  (sinusoidal features of 1000 * t -> Linear -> SiLU -> Linear, as in DiT); with
  model.patch_position_embedding=sincos2d, DiT's fixed 2D sine-cosine embedding of the patch's (row, column) in
  its image is added too (a patch's place in its block is its raster index: blocks are whole frames).

Positions carry no absolute embedding: RoPE over 0..s-1 of the packed sequence is applied in attention.
`latent_rows(layout)` maps Batch latent rows (row-major (b, s) order) to rows of hidden states flattened
sequence-first to [s*b, h]; the velocity head uses the same map.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megafusion.data.batch import MODALITY_IMAGE, Batch
from megafusion.model.attention.layout import AttentionLayout


def latent_rows(layout: AttentionLayout) -> torch.Tensor:
    """[N] indices into [s*b] (sequence-first) of the latent positions, in Batch latent-row order."""

    def build():
        b = layout.batch_size
        bi, si = torch.nonzero(layout.modality == MODALITY_IMAGE, as_tuple=True)  # row-major (b, s) order
        return si * b + bi

    return layout.cached("latent_rows", build)


def noised_latent_rows(layout: AttentionLayout) -> torch.Tensor:
    """[N] bool: which latent rows are noised (carry z_t rather than clean conditioning latents)."""
    return layout.cached("noised_latent_rows", lambda: layout.noised[layout.modality == MODALITY_IMAGE])


def patch_index_in_block(layout: AttentionLayout) -> torch.Tensor:
    """[N] raster index of each latent row inside its visual block (Batch latent-row order)."""

    def build():
        bi, si = torch.nonzero(layout.modality == MODALITY_IMAGE, as_tuple=True)
        n = bi.numel()
        index = torch.arange(n, device=bi.device)
        if n == 0:
            return index
        block = layout.block_ids[bi, si]
        first = torch.ones(n, dtype=torch.bool, device=bi.device)
        first[1:] = (bi[1:] != bi[:-1]) | (block[1:] != block[:-1])
        start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=0).values
        return index - start

    return layout.cached("patch_index_in_block", build)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fp32: half the channels encode the row, half the column, each as DiT's 1D sin-cos
    (frequencies 1 / 10000^(2i / (dim / 2))); rows in raster order. dim must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"model.patch_position_embedding=sincos2d needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    one = torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)  # [grid, dim/2]
    rows = one[:, None, :].expand(grid, grid, dim // 2)
    cols = one[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def make_linear(config, in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    """A replicated (not tensor-parallel) linear layer in the config's dtype, initialised by config.init_method."""
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    linear = torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=config.params_dtype)
    if config.perform_initialization:
        with torch.no_grad():
            config.init_method(linear.weight)
            if bias:
                linear.bias.zero_()
    return linear


def sinusoidal_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] flow times in [0, 1] -> [N, dim] cos/sin features of 1000 * t (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float().unsqueeze(1) * freqs.unsqueeze(0)
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


class TimestepEmbedding(MegatronModule):
    def __init__(self, config):
        super().__init__(config=config)
        self.dim = config.timestep_embed_dim
        self.linear_1 = make_linear(config, self.dim, config.hidden_size)
        self.linear_2 = make_linear(config, config.hidden_size, config.hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """[N] -> [N, h]"""
        x = sinusoidal_features(t, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(torch.nn.functional.silu(self.linear_1(x)))


class MultimodalEmbedding(MegatronModule):
    def __init__(self, config, vocab_size: int, tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size,
            embedding_dim=config.hidden_size,
            init_method=config.embedding_init_method,
            reduce_scatter_embeddings=False,
            config=config,
            tp_group=tp_group,
        )
        self.latent_io = getattr(config, "latent_io", True)
        if self.latent_io:  # the masked-diffusion family has no latent positions (MultimodalTransformerConfig)
            self.patch_embed = make_linear(config, config.patch_dim, config.hidden_size)
            self.timestep_embed = TimestepEmbedding(config)
        self.patches_per_frame = (config.latent_size // config.patch_size) ** 2
        positions = None
        if config.patch_position_embedding == "sincos2d":
            positions = sincos_2d(config.hidden_size, config.latent_size // config.patch_size)
        self.register_buffer("patch_positions", positions, persistent=False)  # None: no 2D embedding
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(self, batch: Batch, layout: AttentionLayout) -> torch.Tensor:
        """-> [s, b, h] ([s/tp, b, h] under sequence parallelism)"""
        if not self.latent_io:
            if batch.num_latent_positions:
                raise ValueError("this model has no latent input (a masked-diffusion model: objective.kind="
                                 "masked_diffusion) but the batch holds latent positions")
            return self._finish(self.word_embeddings(batch.tokens).transpose(0, 1).contiguous())
        if batch.noisy_latents.shape[-1] != self.config.patch_dim:
            raise ValueError(
                f"Batch.noisy_latents has patch_dim {batch.noisy_latents.shape[-1]} but the model expects "
                f"model.latent_channels * model.patch_size**2 = {self.config.patch_dim}"
            )
        b, s = batch.tokens.shape
        text = self.word_embeddings(batch.tokens).transpose(0, 1).contiguous()  # [s, b, h]
        h = text.shape[-1]
        latents = self.patch_embed(batch.noisy_latents.to(self.patch_embed.weight.dtype))  # [N, h]
        noised = noised_latent_rows(layout).unsqueeze(1).to(latents.dtype)
        latents = latents + self.timestep_embed(batch.latent_t) * noised
        if self.patch_positions is not None:
            index = patch_index_in_block(layout)
            if index.numel() and int(index.max()) >= self.patches_per_frame:
                raise ValueError(f"a visual block holds more than {self.patches_per_frame} latent positions "
                                 f"((latent_size / patch_size)^2); blocks must be single frames")
            latents = latents + self.patch_positions.to(latents.dtype).index_select(0, index)
        # every branch runs even with N = 0, so all parameters take part in every step on every rank
        embeddings = text.view(s * b, h).index_copy(0, latent_rows(layout), latents.to(text.dtype)).view(s, b, h)
        return self._finish(embeddings)

    def _finish(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Residual dtype, dropout, and under sequence parallelism this rank's slice."""
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        if not self.config.sequence_parallel:
            return self.embedding_dropout(embeddings)
        # as megatron's LanguageModelEmbedding: keep this rank's slice of the sequence (a clone, so the full
        # tensor can be freed) and draw its dropout from the tensor-parallel RNG stream
        embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=self.tp_group)
        if self.config.clone_scatter_output_in_embedding:
            embeddings = embeddings.clone()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.embedding_dropout(embeddings)
