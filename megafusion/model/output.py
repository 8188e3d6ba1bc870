"""ModelOutput: what the last pipeline stage of MultimodalModel returns.

    logits    [s, b, V_padded / tp]  vocab-parallel LM logits at every position (sequence-first, like megatron);
                                     the CE loss reads text positions through Batch.loss_mask / labels. In
                                     generation [1, b, V_padded / tp] at the inference context's
                                     logit_positions, or None when it asks for none
    velocity  [N, patch_dim]         predicted flow-matching velocity, one row per latent position, rows aligned
                                     with Batch.latents (row-major (b, s) order)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]
    velocity: torch.Tensor
