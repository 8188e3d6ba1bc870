"""megafusion.objectives: the training losses.

flow_matching   flow-time sampling, noising a Batch (z_t, targets, CFG condition dropout), velocity MSE
cross_entropy   next-token CE over vocab-parallel logits
loss_weighting  fixed or adaptive (EMA-centred) weights of the two terms, step commit, DP reduction
losses          compute_losses: the weighted total of one micro-batch and its LossBreakdown for logging
"""

from megafusion.objectives.cross_entropy import text_cross_entropy
from megafusion.objectives.flow_matching import flow_matching_loss, noise_batch, sample_timesteps, shift_timesteps
from megafusion.objectives.loss_weighting import (
    AdaptiveWeighting,
    FixedWeighting,
    build_loss_weighting,
    reduce_for_weighting,
)
from megafusion.objectives.losses import LossBreakdown, compute_losses, step_losses

__all__ = [
    "AdaptiveWeighting",
    "FixedWeighting",
    "LossBreakdown",
    "build_loss_weighting",
    "compute_losses",
    "flow_matching_loss",
    "noise_batch",
    "reduce_for_weighting",
    "sample_timesteps",
    "shift_timesteps",
    "step_losses",
    "text_cross_entropy",
]
