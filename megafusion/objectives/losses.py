"""The joint objective of one micro-batch: text cross-entropy + flow matching, weighted, with every term logged.

`compute_losses(output, batch, weighting)` takes any model output with `.logits` [s, b, V/tp] (vocab-parallel) and
`.velocity` [N, patch_dim] (one row per latent position of the batch) and returns a `LossBreakdown`: the
differentiable total lambda_ce * L_ce + lambda_fm * L_fm (the weights detached) and the separate terms, weights and
token counts as detached tensors (no host sync until `as_log_dict`). The step-level EMA update of adaptive
weighting is the caller's: `step_losses` averages a step's breakdowns for `reduce_for_weighting` / `commit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from megafusion.data.batch import Batch
from megafusion.objectives.cross_entropy import text_cross_entropy
from megafusion.objectives.flow_matching import flow_matching_loss
from megafusion.objectives.loss_weighting import LossWeighting


@dataclass
class LossBreakdown:
    total: torch.Tensor  # differentiable scalar: ce_weight * ce + fm_weight * fm
    ce: torch.Tensor  # detached mean CE over text targets (0 when none)
    fm: torch.Tensor  # detached mean velocity MSE over noised rows and the patch dim (0 when none)
    ce_weight: torch.Tensor  # detached lambda_ce used in `total`
    fm_weight: torch.Tensor  # detached lambda_fm used in `total`
    num_text_tokens: torch.Tensor  # int64 count of CE targets
    num_latent_tokens: torch.Tensor  # int64 count of noised latent rows

    def as_log_dict(self, prefix: str = "") -> Dict[str, float]:
        return {
            f"{prefix}loss": float(self.total.detach()),
            f"{prefix}loss_ce": float(self.ce),
            f"{prefix}loss_fm": float(self.fm),
            f"{prefix}weight_ce": float(self.ce_weight),
            f"{prefix}weight_fm": float(self.fm_weight),
            f"{prefix}text_tokens": float(self.num_text_tokens),
            f"{prefix}latent_tokens": float(self.num_latent_tokens),
        }


def compute_losses(output, batch: Batch, weighting: LossWeighting) -> LossBreakdown:
    """CE on output.logits [s, b, V/tp], flow matching on output.velocity [N, patch_dim], combined by `weighting`."""
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ValueError("compute_losses needs output.logits [s, b, V/tp]; the model output has none (only the "
                         "last pipeline stage computes losses)")
    ce, n_ce = text_cross_entropy(logits, batch)
    velocity = getattr(output, "velocity", None)
    if velocity is None:
        if batch.fm_loss_mask is not None and bool(batch.fm_loss_mask.any()):
            raise ValueError("the batch has noised latent rows but output.velocity is None; the model must "
                             "predict a velocity [N, patch_dim] for every latent row")
        fm, n_fm = torch.zeros((), device=ce.device), torch.zeros((), dtype=torch.long, device=ce.device)
    else:
        fm, n_fm = flow_matching_loss(velocity, batch)
    w_ce, w_fm = weighting.weights(ce.detach(), fm.detach(), n_ce, n_fm)
    total = w_ce.to(ce.device) * ce + w_fm.to(fm.device) * fm
    return LossBreakdown(total=total, ce=ce.detach(), fm=fm.detach(), ce_weight=w_ce, fm_weight=w_fm,
                         num_text_tokens=n_ce, num_latent_tokens=n_fm)


def step_losses(breakdowns: Sequence[LossBreakdown]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-micro-batch CE and FM losses of one step as two 1-D tensors (0 where a term was absent), ready for
    megafusion.objectives.loss_weighting.reduce_for_weighting."""
    if not breakdowns:
        return torch.zeros(0), torch.zeros(0)
    ce = torch.stack([torch.where(b.num_text_tokens > 0, b.ce, torch.zeros_like(b.ce)) for b in breakdowns])
    fm = torch.stack([torch.where(b.num_latent_tokens > 0, b.fm, torch.zeros_like(b.fm)) for b in breakdowns])
    return ce, fm
