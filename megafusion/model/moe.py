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

import contextlib
import dataclasses
from contextlib import contextmanager
from functools import partial
from typing import Tuple

import torch
import torch.distributed as dist
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec

LOAD_BALANCING_LOSS = "load_balancing_loss"  # megatron's tracker name of the aux_loss balancing type


def aux_loss_tracker_name(modality: str) -> str:
    """Name under which `modality`'s routers record their load-balancing loss in megatron's MoE tracker."""
    return modality_loss_name(LOAD_BALANCING_LOSS, modality)


def modality_loss_name(name: str, modality: str) -> str:
    """Tracker name of one of megatron's router losses (load_balancing_loss, global_load_balancing_loss, z_loss)
    for `modality`'s routers."""
    return f"{name}_{modality}"


class ModalityRouter(TopKRouter):
    """megatron 0.16.1's TopKRouter that files its losses under its modality's names and counts, per micro-batch
    in training, the tokens each expert took and the tokens capacity dropping removed (read and reset by
    megafusion/training/moe_metrics.py). Padding rows count nowhere."""

    def __init__(self, config, pg_collection=None, *, modality: str):
        super().__init__(config=config, pg_collection=pg_collection)
        self.modality = modality
        self._counts = None  # [experts + 1] on the router's device: tokens per expert, then dropped tokens

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, *args,
                                           **kwargs):
        return super().attach_and_log_load_balancing_loss(activation, aux_loss_coeff, aux_loss,
                                                          modality_loss_name(aux_loss_name, self.modality), *args,
                                                          **kwargs)

    def apply_z_loss(self, logits, padding_mask=None):
        """megatron's z-loss, its logged value moved from the shared "z_loss" entry to this modality's."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        before = tracker["z_loss"]["values"].clone() if "z_loss" in tracker else None
        logits = super().apply_z_loss(logits, padding_mask=padding_mask)
        if "z_loss" in tracker:
            entry = tracker["z_loss"]
            added = entry["values"] - (before if before is not None else 0)
            name = modality_loss_name("z_loss", self.modality)
            if name not in tracker:
                tracker[name] = {**entry, "values": torch.zeros_like(entry["values"])}
            tracker[name]["values"] += added
            entry["values"] -= added
        return logits

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        """megatron-core 0.16.1's TopKRouter._apply_expert_bias masks the [tokens, experts] routing map with the
        flattened [tokens] padding mask, which does not broadcast (every MoE layer with expert bias and a padding
        mask fails); the mask is handed over as [tokens, 1]."""
        if padding_mask is not None and padding_mask.dim() == 1:
            padding_mask = padding_mask.unsqueeze(-1)
        return super()._apply_expert_bias(routing_map, padding_mask=padding_mask)

    def routing(self, logits, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training:  # counted on the device: no host synchronisation per micro-batch
            with torch.no_grad():
                valid = torch.ones(routing_map.shape[0], dtype=torch.bool, device=routing_map.device)
                if padding_mask is not None:
                    valid = ~padding_mask.reshape(-1).to(routing_map.device)
                per_expert = (routing_map & valid.unsqueeze(1)).sum(0).double()
                dropped = valid.sum().double() * self.topk - per_expert.sum()
                counts = torch.cat([per_expert, dropped.view(1)])
                self._counts = counts if self._counts is None else self._counts + counts
        return probs, routing_map

    def take_counts(self) -> torch.Tensor:
        """[experts + 1] float64: tokens each expert took since the last call, then the tokens dropped for
        capacity (zeros when nothing was routed); resets them."""
        counts = self._counts
        self._counts = None
        if counts is None:
            return torch.zeros(self.config.num_moe_experts + 1, dtype=torch.float64)
        return counts


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


def _per_sequence_index(layout, modality: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The modality's rows (sequence-first order) laid out per batch row: (table [m, b] of row indices, `rows`
    where a sequence has fewer, position-in-sequence [n], batch row [n])."""
    def build():
        flat = layout.modality_rows(modality)
        b = layout.batch_size
        seq = flat % b
        n = flat.numel()
        order = torch.arange(n, device=flat.device)
        counts = torch.bincount(seq, minlength=b)
        m = int(counts.max()) if n else 0
        # rows are in (s, b) order, so within one batch row they come in sequence order
        position = torch.empty_like(order)
        for j in range(b):
            mine = order[seq == j]
            position[mine] = torch.arange(mine.numel(), device=flat.device)
        table = torch.full((max(m, 1), b), n, dtype=torch.long, device=flat.device)
        table[position, seq] = order
        return table, position, seq

    table, position, seq = layout.cached(f"moe_sequence_table_{modality}", build)
    return table, position, seq


def _sequence_balanced(ffn) -> bool:
    balancing = getattr(ffn.config, "moe_router_load_balancing_type", "none")
    return "seq_aux_loss" in (balancing if isinstance(balancing, (list, tuple)) else [balancing])


def run_moe_rows(ffn, x: torch.Tensor, padding: torch.Tensor, layout, modality: int, tp_group) -> torch.Tensor:
    """A modality's rows x [n, h] (padding [n], True = padding) through its MoE layer -> [n, h].

    - Rows go in as n one-token sequences [1, n, h], padded as rows_to_run says (module docstring). With
      seq_aux_loss balancing they go in as the batch's sequences instead: [m, b, h], each batch row's rows of this
      modality in order, shorter sequences padded, so megatron's per-sequence balancing sees real sequences.
    - Under tensor parallelism (ffn built sequence parallel, ModalityMLP) each TP rank runs its equal share of the
      first dimension (padded to a multiple of TP; backward all-gathers the input gradient) and the shares' outputs
      are all-gathered (backward keeps this rank's share of the replicated gradient): megatron's sequence-parallel
      MoE, where the dispatcher gathers the shares for the TP-sharded experts and reduce-scatters them back."""
    from megatron.core import tensor_parallel

    n, h = x.shape
    tp = tp_group.size() if tp_group is not None else 1
    if _sequence_balanced(ffn):
        table, position, seq = _per_sequence_index(layout, modality)
        m = rows_to_run(ffn, table.shape[0] if n else 0, layout, modality)
        m = -(-m // tp) * tp
        if m > table.shape[0]:
            table = torch.cat([table, table.new_full((m - table.shape[0], table.shape[1]), n)])
        padded = torch.cat([x, x.new_zeros(1, h)])
        x_in = padded.index_select(0, table.reshape(-1)).view(m, -1, h)  # [m, b, h]
        pad_in = torch.cat([padding, padding.new_ones(1)]).index_select(0, table.reshape(-1)).view(m, -1)
        pad_in = pad_in.transpose(0, 1)  # megatron's [b, s]
    else:
        total = rows_to_run(ffn, n, layout, modality)
        total = -(-total // tp) * tp
        x_in = torch.cat([x, x.new_zeros(total - n, h)]).unsqueeze(0)  # [1, total, h]
        pad_in = torch.cat([padding, padding.new_ones(total - n)]).unsqueeze(1)  # [total, 1]
        position = seq = None
    first_dim = 0 if position is not None else 1
    if tp > 1:
        x_in = x_in.transpose(0, first_dim) if first_dim else x_in
        x_in = tensor_parallel.scatter_to_sequence_parallel_region(x_in, group=tp_group)
        x_in = x_in.transpose(0, first_dim) if first_dim else x_in
        pad_in = pad_in.chunk(tp, dim=1 if first_dim == 0 else 0)[tp_group.rank()]
    with without_router_losses(ffn) if n == 0 else contextlib.nullcontext():
        out, bias = ffn(x_in, padding_mask=pad_in)
    if bias is not None:
        out = out + bias
    if tp > 1:
        out = out.transpose(0, first_dim) if first_dim else out
        out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False,
                                                                   group=tp_group)
        out = out.transpose(0, first_dim) if first_dim else out
    if position is not None:
        return out[position, seq]
    return out.reshape(-1, h)[:n]
