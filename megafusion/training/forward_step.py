"""The forward step handed to megatron's schedule, and the noising of micro-batches before it.

megatron's get_forward_backward_func calls `forward_step(data_iterator, model)` once per micro-batch on every
pipeline stage; the last stage calls the returned loss function on the model output. Every stage pulls the same
Batch (its metadata is small), so each stage can build its attention layout and route its FFNs.

With objective.kind = masked_diffusion the micro-batches are discrete (megafusion.discrete) and are masked by
megafusion.objectives.masked_diffusion.mask_batch from the same per-micro-batch generator; the loss is the
ELBO-weighted CE, reported per modality as sums and counts (`md_*`) that the loop turns into loss_text /
loss_image / loss_audio.

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
from megafusion.objectives.masked_diffusion import mask_batch, masked_diffusion_loss, vocab_from_config


def noise_generator(seed: int, first_sample_index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + first_sample_index) % (2**63 - 1))
    return g


def noisy_microbatches(
    items: List[Tuple[Batch, int]], objective: ObjectiveConfig, seed: int, device: torch.device, dtype=None
) -> List[Batch]:
    """(clean batch, first global sample index) pairs -> noised (or masked) batches on `device`."""
    out = []
    masked = objective.kind == "masked_diffusion"
    vocab = vocab_from_config(objective.masked_diffusion) if masked else None
    for batch, first_index in items:
        generator = noise_generator(seed, first_index)
        if masked:
            noised = mask_batch(batch, objective.masked_diffusion, vocab, generator)
        else:
            noised = noise_batch(batch, objective, generator)
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


def _masked_loss_func(batch: Batch, vocab_size: int, output) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    total, parts = masked_diffusion_loss(output.logits, batch, vocab_size)
    zero, one = torch.zeros((), dtype=torch.float32), torch.ones((), dtype=torch.float32)
    report = {"loss": total.detach().clone().float(), "loss_ce": total.detach().clone().float(), "loss_fm": zero,
              "weight_ce": one, "weight_fm": zero}
    report.update({k: v.cpu() for k, v in parts.items()})
    return total, report


def make_forward_step(weighting, objective=None):
    """A megatron forward_step_func: flow matching's loss uses `weighting` (fixed or adaptive); masked
    diffusion's is the ELBO-weighted CE over the unified vocabulary."""
    masked = objective is not None and objective.kind == "masked_diffusion"
    vocab_size = vocab_from_config(objective.masked_diffusion).size if masked else 0

    def forward_step(data_iterator: Iterator[Batch], model):
        batch = next(data_iterator)
        output = model(batch)
        if masked:
            return output, partial(_masked_loss_func, batch, vocab_size)
        return output, partial(_loss_func, batch, weighting)

    return forward_step


def is_summed(key: str) -> bool:
    """Report values summed over micro-batches and ranks (counts and sums) rather than averaged."""
    return key.endswith("_tokens") or key.startswith("md_")


def average_reports(reports: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Mean of each reported value over this rank's micro-batches (token counts are summed)."""
    if not reports:
        return {}
    out = {}
    for key in reports[0]:
        values = torch.stack([r[key].float().reshape(()) for r in reports])
        out[key] = values.sum() if is_summed(key) else values.mean()
    return out
