"""megafusion.objectives: the training losses.

flow_matching   flow-time sampling, noising a Batch (z_t, targets, CFG condition dropout), velocity MSE
cross_entropy   next-token CE over vocab-parallel logits
loss_weighting  fixed or adaptive (EMA-centred) weights of the two terms, step commit, DP reduction
losses          compute_losses: the weighted total of one micro-batch and its LossBreakdown for logging

The names below are imported lazily, so `import megafusion.objectives.flow_matching` or `.loss_weighting` does not
pull in megatron-core (only cross_entropy and losses need it).
"""

import importlib

_EXPORTS = {
    "text_cross_entropy": "cross_entropy",
    "flow_matching_loss": "flow_matching",
    "noise_batch": "flow_matching",
    "apply_noise": "flow_matching",
    "sample_timesteps": "flow_matching",
    "shift_timesteps": "flow_matching",
    "AdaptiveWeighting": "loss_weighting",
    "FixedWeighting": "loss_weighting",
    "build_loss_weighting": "loss_weighting",
    "reduce_for_weighting": "loss_weighting",
    "LossBreakdown": "losses",
    "compute_losses": "losses",
    "step_losses": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megafusion.objectives' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megafusion.objectives.{_EXPORTS[name]}"), name)
