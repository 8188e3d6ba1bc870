"""What the MoE layers did in one training step, for logging: balancing and z losses, expert loads, dropped tokens.

megatron's routers add coeff * L_aux (and coeff_z * L_z) of every micro-batch to the gradients themselves
(MoEAuxLossAutoScaler, scaled by the schedule by 1 / num_microbatches because config.num_moe_experts is set) and
record L_aux and L_z (without their coefficients) per layer in megatron's tracker; megafusion's ModalityRouter
files them under its modality's names and counts the tokens each expert took and the tokens capacity dropping
removed (megafusion/model/moe.py). Once per step, on every rank:

    moe_aux_loss_<modality>            sum over layers and micro-batches of L_aux / (layers * micro-batches),
                                       summed over pipeline stages, mean over data-parallel ranks
    moe_aux_loss                       mean of the per-modality values (the balancing term the gradients saw,
                                       divided by its coefficient)
    moe/<modality>/layerNN/load_balancing_loss, z_loss      the same per layer (mean over micro-batches and DP)
    moe/<modality>/layerNN/tokens_per_expert_min|mean|max    tokens routed to each expert in the step, all
                                                             data-parallel ranks together (padding excluded)
    moe/<modality>/layerNN/dropped_tokens                    tokens removed by expert capacity in the step

(seq_aux_loss and global_aux_loss balancing are logged under the same names.) All per-rank numbers form one vector reduced over
the whole world (pipeline stages hold different layers; under tensor parallelism each rank routes and records
its own share of a modality's rows, so TP ranks add up), so every rank enters the same collective whether or not its routers ran; then the tracker and the counts are cleared.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from megafusion.model.moe import LOAD_BALANCING_LOSS, ModalityRouter, modality_loss_name

BALANCING_NAMES = {"aux_loss": LOAD_BALANCING_LOSS, "seq_aux_loss": f"seq_{LOAD_BALANCING_LOSS}",
                   "global_aux_loss": f"global_{LOAD_BALANCING_LOSS}"}


class MoEMeter:
    def __init__(self, config, model_chunks: List[torch.nn.Module], dp_size: int, tp_size: int,
                 device: torch.device):
        self.modalities = tuple(getattr(config, "moe_modalities", ())) if getattr(config, "num_moe_experts", None) \
            else ()
        self.balancing = BALANCING_NAMES.get(getattr(config, "moe_router_load_balancing_type", "none"))
        self.z_loss = getattr(config, "moe_z_loss_coeff", None) is not None
        self.num_layers, self.num_experts = config.num_layers, getattr(config, "num_moe_experts", None) or 0
        self.dp_size, self.tp_size, self.device = dp_size, tp_size, device
        self.routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, ModalityRouter)]
        # megatron's tracker is process-wide and sizes an entry by the first model that logs under its name: a
        # second model of another depth in this process would index past it, so start from an empty one
        get_moe_layer_wise_logging_tracker().clear()

    @property
    def enabled(self) -> bool:
        return bool(self.modalities)

    def _layout(self):
        """Offsets of each modality's block in the reduced vector: aux [L], z [L], tokens [L, E], dropped [L]."""
        L, E = self.num_layers, self.num_experts
        width = L * (3 + E)
        return width, {m: i * width for i, m in enumerate(self.modalities)}

    def collect(self, num_microbatches: int) -> Dict[str, float]:
        """This step's values (identical on every rank); clears megatron's tracker and the routers' counts."""
        if not self.enabled:
            return {}
        L, E = self.num_layers, self.num_experts
        width, offset = self._layout()
        vec = torch.zeros(width * len(self.modalities), dtype=torch.float64, device=self.device)
        tracker = get_moe_layer_wise_logging_tracker()
        for m in self.modalities:
            o = offset[m]
            for k, name in enumerate((self.balancing, "z_loss")):
                entry = tracker.get(modality_loss_name(name, m)) if name else None
                if entry is not None:
                    vec[o + k * L:o + (k + 1) * L] = entry["values"][:L].to(vec)
        for router in self.routers:
            counts = router.take_counts().to(vec)  # under TP each rank routes its own share of the rows
            o, layer = offset[router.modality], router.layer_number - 1
            vec[o + 2 * L + layer * E:o + 2 * L + (layer + 1) * E] += counts[:E]
            vec[o + 2 * L + L * E + layer] += counts[E]
        dist.all_reduce(vec)
        clear_aux_losses_tracker()
        vec = vec.cpu()
        values: Dict[str, float] = {}
        # mean over micro-batches and DP ranks; under TP each rank recorded the part of its share of the rows
        per_step = self.dp_size * num_microbatches
        for m in self.modalities:
            o = offset[m]
            aux = vec[o:o + L] / per_step
            z = vec[o + L:o + 2 * L] / per_step
            tokens = vec[o + 2 * L:o + 2 * L + L * E].view(L, E)
            dropped = vec[o + 2 * L + L * E:o + 3 * L + L * E]
            if self.balancing:
                values[f"moe_aux_loss_{m}"] = float(aux.sum() / L)
            for layer in range(L):
                key = f"moe/{m}/layer{layer:02d}"
                if self.balancing:
                    values[f"{key}/load_balancing_loss"] = float(aux[layer])
                if self.z_loss:
                    values[f"{key}/z_loss"] = float(z[layer])
                values[f"{key}/tokens_per_expert_min"] = float(tokens[layer].min())
                values[f"{key}/tokens_per_expert_mean"] = float(tokens[layer].mean())
                values[f"{key}/tokens_per_expert_max"] = float(tokens[layer].max())
                values[f"{key}/dropped_tokens"] = float(dropped[layer])
        if self.balancing:
            values["moe_aux_loss"] = sum(values[f"moe_aux_loss_{m}"] for m in self.modalities) / len(self.modalities)
        return values
