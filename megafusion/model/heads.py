"""Output heads: the LM head (vocab-parallel logits) and the velocity head (flow matching), plus patchify helpers.

- LM head: megatron's ColumnParallelLinear h -> padded vocab with gather_output=False, so logits stay
  vocab-parallel [s, b, V/tp] for megatron's vocab_parallel_cross_entropy. With
  share_embeddings_and_output_weights it allocates no weight and the model passes the word embedding's weight
  (megatron LanguageModule's tying machinery, across pipeline stages too).
- VelocityHead: a norm-free linear h -> patch_dim on the latent rows (the block's final norm precedes it), rows
  in Batch latent order; under sequence parallelism it first gathers the sequence.
- patchify / unpatchify: latent [..., C, H, W] <-> patches [..., (H/p)*(W/p), C*p*p]; patches in raster order,
  each patch vector laid out as (C, p, p) flattened (docs/DATA_FORMAT.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megafusion.model.attention.layout import AttentionLayout
from megafusion.model.embeddings import latent_rows, make_linear


def build_lm_head(config, vocab_size: int, skip_weight: bool, tp_group=None) -> tensor_parallel.ColumnParallelLinear:
    """ColumnParallelLinear h -> vocab_size (padded); `skip_weight` when tied to the embedding on this stage (with
    megafusion's generation fast path: megafusion/model/inference_linear.py)."""
    from megafusion.model.inference_linear import InferenceColumnParallelLinear

    return InferenceColumnParallelLinear(
        config.hidden_size,
        vocab_size,
        config=config,
        init_method=config.init_method,
        bias=False,
        skip_bias_add=False,
        gather_output=False,
        skip_weight_param_allocation=skip_weight,
        tp_group=tp_group,
    )


class VelocityHead(MegatronModule):
    def __init__(self, config, tp_group=None):
        super().__init__(config=config)
        self.tp_group = tp_group
        self.linear = make_linear(config, config.hidden_size, config.patch_dim)

    def forward(self, hidden_states: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """hidden_states [s, b, h] ([s/tp, b, h] under sequence parallelism) -> velocity [N, patch_dim] (Batch
        latent-row order)."""
        if self.config.sequence_parallel:
            # the head is replicated and every TP rank computes the same loss, so the backward keeps this rank's
            # slice of the (identical) gradient rather than summing it over the group
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        s, b, h = hidden_states.shape
        rows = hidden_states.reshape(s * b, h).index_select(0, latent_rows(layout))
        return self.linear(rows)


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[..., C, H, W] -> [..., (H/p)*(W/p), C*p*p]"""
    *lead, c, h, w = latent.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: latent {h}x{w} is not divisible by patch_size={p}")
    k = len(lead)
    x = latent.reshape(*lead, c, h // p, p, w // p, p)
    x = x.permute(*range(k), k + 1, k + 3, k, k + 2, k + 4)  # [..., H/p, W/p, C, p, p]
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """[..., (H/p)*(W/p), C*p*p] -> [..., C, H, W] for latent_shape (C, H, W)."""
    c, h, w = (int(v) for v in latent_shape)
    *lead, n, d = patches.shape
    p = int(round((d // c) ** 0.5))
    if c * p * p != d or n * p * p != h * w or h % p or w % p:
        raise ValueError(f"unpatchify: patches [..., {n}, {d}] do not tile a latent of shape {(c, h, w)}")
    x = patches.reshape(*lead, h // p, w // p, c, p, p)
    k = len(lead)
    x = x.permute(*range(k), k + 2, k, k + 3, k + 1, k + 4)  # [..., C, H/p, p, W/p, p]
    return x.reshape(*lead, c, h, w)
