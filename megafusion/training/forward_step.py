"""The forward step handed to megatron's schedule, and the noising of micro-batches before it.

megatron's get_forward_backward_func calls `forward_step(data_iterator, model)` once per micro-batch on every
pipeline stage; the last stage calls the returned loss function on the model output. Every stage pulls the same
Batch (its metadata is small), so each stage can build its attention layout and route its FFNs.

Flow times, noise and condition dropout are drawn in `noisy_microbatches` from a generator seeded by
(training seed, global index of the micro-batch's first sample): every TP/PP rank draws identical noise, a
micro-batch gets the same noise whatever the data-parallel layout, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Tuple

import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import Batch
from megafusion.objectives import compute_losses, noise_batch


def noise_generator(seed: int, first_sample_index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + first_sample_index) % (2**63 - 1))
    return g


def noisy_microbatches(
    items: List[Tuple[Batch, int]], objective: ObjectiveConfig, seed: int, device: torch.device, dtype=None
) -> List[Batch]:
    """(clean batch, first global sample index) pairs -> noised batches on `device`."""
    out = []
    for batch, first_index in items:
        noised = noise_batch(batch, objective, noise_generator(seed, first_index))
        out.append(noised.to(device=device, dtype=dtype))
    return out


def _loss_func(batch: Batch, weighting, output) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    breakdown = compute_losses(output, batch, weighting)
    report = {
        "loss": breakdown.total.detach().clone().float(),  # megatron divides the returned loss in place
        "loss_ce": torch.as_tensor(breakdown.ce, dtype=torch.float32).detach(),
        "loss_fm": torch.as_tensor(breakdown.fm, dtype=torch.float32).detach(),
        "weight_ce": torch.as_tensor(breakdown.ce_weight, dtype=torch.float32).detach(),
        "weight_fm": torch.as_tensor(breakdown.fm_weight, dtype=torch.float32).detach(),
        "text_tokens": torch.as_tensor(float(breakdown.num_text_tokens)),
        "latent_tokens": torch.as_tensor(float(breakdown.num_latent_tokens)),
    }
    return breakdown.total, report


def make_forward_step(weighting):
    """A megatron forward_step_func whose loss uses `weighting` (fixed or adaptive)."""

    def forward_step(data_iterator: Iterator[Batch], model):
        batch = next(data_iterator)
        output = model(batch)
        return output, partial(_loss_func, batch, weighting)

    return forward_step


def average_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Mean of each reported value over this rank's micro-batches (token counts are summed)."""
    if not reports:
        return {}
    out = {}
    for key in reports[0]:
        values = torch.stack([r[key].float().reshape(()) for r in reports])
        out[key] = values.sum() if key.endswith("_tokens") else values.mean()
    return out
