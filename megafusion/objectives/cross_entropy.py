"""Next-token cross-entropy on text positions, with the vocabulary split over tensor-parallel ranks.

The LM head produces logits [s, b, V/tp] (sequence-first, each TP rank holding a contiguous vocabulary slice);
megatron.core.tensor_parallel.vocab_parallel_cross_entropy reduces max / sum-exp / target logit over the TP group
in fp32. The loss is the mean over Batch.loss_mask (text positions whose next token is text of the same document).
When megatron's model-parallel state is not initialised (a single process without TP: unit tests, tools), the
full vocabulary is local and torch.nn.functional.cross_entropy computes the same quantity.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megafusion.data.batch import Batch


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [s, b, V/tp], labels [s, b] (every label a valid vocabulary id) -> [s, b] fp32 losses."""
    if parallel_state.model_parallel_is_initialized():
        # megatron's kernel works in place on its fp32 input: give it a copy so the caller's logits stay intact
        # (bf16 logits are copied by the cast anyway).
        logits32 = logits.float() if logits.dtype != torch.float32 else logits.clone()
        return vocab_parallel_cross_entropy(logits32, labels)
    s, b, v = logits.shape
    return F.cross_entropy(logits.float().reshape(s * b, v), labels.reshape(s * b), reduction="none").view(s, b)


def text_cross_entropy(logits: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token CE over batch.loss_mask.

    logits: [s, b, V/tp] vocab-parallel. Returns (loss, count): a float32 scalar (0 with the graph connected to the
    logits when loss_mask is empty) and the number of target tokens as a detached int64 scalar.
    """
    b, s = batch.labels.shape
    if logits.dim() != 3 or logits.shape[0] != s or logits.shape[1] != b:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected [s, b, V/tp] with s={s}, b={b} "
                         f"(sequence-first, like megatron's output layer)")
    mask = batch.loss_mask.t().float()  # [s, b]
    # Labels outside the loss mask may hold any value (padding, placeholders); make them a valid id.
    labels = torch.where(mask > 0, batch.labels.t(), torch.zeros((), dtype=batch.labels.dtype,
                                                                  device=batch.labels.device)).contiguous()
    losses = per_token_cross_entropy(logits, labels)  # [s, b]
    count = mask.sum()
    loss = (losses * mask).sum() / count.clamp(min=1.0)
    return loss, count.detach().long()
