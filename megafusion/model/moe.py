"""The mixture-of-experts FFN of one modality: megatron's MoELayer spec with a router that knows its modality.

`get_moe_spec(config, use_te, modality)` is megatron's get_moe_module_spec (router -> token dispatcher ->
experts -> combine; SequentialMLP, or TEGroupedMLP with config.moe_grouped_gemm on Transformer Engine) with the
router replaced by ModalityRouter. ModalityMLP (megafusion/model/modality_mlp.py) puts it in a modality's slot, so
text and image tokens never share experts or a router; expert parallelism, dispatchers and sharded checkpoints
(experts keyed by their global index, so a checkpoint reshards across expert-parallel sizes) are megatron's.

megatron tracks each router's load-balancing loss for logging per (name, layer number); a layer holds one router
per modality, so ModalityRouter files it under a name that carries the modality (`aux_loss_tracker_name`), read by
megafusion/training/moe_metrics.py.

How many rows a modality's MoE layer runs (`rows_to_run`): a modality with no rows in a micro-batch still runs
one padding row, so every rank enters the dispatcher's collectives (and megatron's router cannot reshape an empty
batch); megatron's allgather dispatcher all-gathers equal-sized token blocks over its expert-parallel group, so
there every rank pads its rows to the group's largest count (one all-reduce per modality and micro-batch, cached in
the AttentionLayout). Padding rows are marked in the padding mask (kept out of the balancing statistics), start as
zeros (so they add nothing to expert weight gradients) and their outputs are dropped.
`without_router_losses` keeps a call with no valid rows from adding a load-balancing loss: megatron's switch loss
divides by the token count (0 * inf = NaN in its value and its gradient), where the exact loss is 0.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec

LOAD_BALANCING_LOSS = "load_balancing_loss"  # megatron's tracker name of the aux_loss balancing type


def aux_loss_tracker_name(modality: str) -> str:
    """Name under which `modality`'s routers record their load-balancing loss in megatron's MoE tracker."""
    return f"{LOAD_BALANCING_LOSS}_{modality}"


class ModalityRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, *, modality: str):
        super().__init__(config=config, pg_collection=pg_collection)
        self.modality = modality

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, *args,
                                           **kwargs):
        return super().attach_and_log_load_balancing_loss(activation, aux_loss_coeff, aux_loss,
                                                          f"{aux_loss_name}_{self.modality}", *args, **kwargs)


def rows_to_run(ffn, rows: int, layout, modality: int) -> int:
    """Rows `ffn` must be given for a modality with `rows` rows on this rank (module docstring); >= rows."""
    dispatcher = getattr(ffn, "token_dispatcher", None)
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher) and dispatcher.tp_ep_group.size() > 1:
        def group_max():
            count = torch.tensor([rows], dtype=torch.int64, device=layout.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dispatcher.tp_ep_group)
            return int(count.item())

        rows = layout.cached(f"moe_allgather_rows_{modality}", group_max)
    return max(rows, 1)


@contextmanager
def without_router_losses(ffn):
    """Run `ffn` (an MoE layer; anything else passes through) with its router adding no aux / z loss: megatron's
    router adds them only in training mode."""
    router = getattr(ffn, "router", None)
    if router is None or not router.training:
        yield
        return
    router.training = False
    try:
        yield
    finally:
        router.training = True


def get_moe_spec(config, use_te: bool, modality: str) -> ModuleSpec:
    """megatron's MoELayer spec for `modality` (local SequentialMLP experts, or TE; grouped GEMM from config)."""
    spec = get_moe_module_spec(use_te=use_te, num_experts=config.num_moe_experts,
                               moe_grouped_gemm=bool(config.moe_grouped_gemm))
    router = partial(ModalityRouter, modality=modality)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=router))
