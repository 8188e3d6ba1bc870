"""The MoE load-balancing loss of one training step, for logging: `moe_aux_loss` and one value per MoE modality.

megatron's routers add coeff * L_aux of every micro-batch to the gradients themselves (MoEAuxLossAutoScaler, scaled
by the schedule by 1 / num_microbatches because config.num_moe_experts is set) and record L_aux (without the
coefficient) per layer in megatron's tracker; megafusion's ModalityRouter records it under its modality's name
(megafusion/model/moe.py). Once per step, on every rank:

    moe_aux_loss_<modality> = sum over layers and micro-batches of L_aux
                              / (layers * micro-batches), summed over pipeline stages, mean over data-parallel ranks
    moe_aux_loss            = mean of the per-modality values

which is the balancing term of the objective that the gradients saw, divided by its coefficient. The per-rank sums
form one vector reduced over the whole world (pipeline stages hold different layers; tensor-parallel size is 1 for
MoE models), so every rank enters the same collective whether or not its routers ran (a router with no rows adds
nothing). Then the tracker is cleared.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from megafusion.model.moe import aux_loss_tracker_name


class MoEAuxLossMeter:
    def __init__(self, config, dp_size: int, device: torch.device):
        balanced = getattr(config, "moe_router_load_balancing_type", "none") == "aux_loss"
        self.modalities = tuple(getattr(config, "moe_modalities", ())) if balanced else ()
        self.num_layers = config.num_layers
        self.dp_size = dp_size
        self.device = device
        clear_aux_losses_tracker()

    @property
    def enabled(self) -> bool:
        return bool(self.modalities)

    def collect(self, num_microbatches: int) -> Dict[str, float]:
        """This step's values (identical on every rank); clears megatron's tracker. {} without MoE balancing."""
        if not self.enabled:
            return {}
        tracker = get_moe_layer_wise_logging_tracker()
        sums = torch.zeros(len(self.modalities), dtype=torch.float64, device=self.device)
        for i, modality in enumerate(self.modalities):
            entry = tracker.get(aux_loss_tracker_name(modality))
            if entry is not None:
                sums[i] = entry["values"].sum().to(sums)
        dist.all_reduce(sums)
        sums /= self.dp_size * num_microbatches * self.num_layers
        clear_aux_losses_tracker()
        values = {f"moe_aux_loss_{m}": float(v) for m, v in zip(self.modalities, sums.cpu().tolist())}
        values["moe_aux_loss"] = sum(values.values()) / len(values)
        return values
