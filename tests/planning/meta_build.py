"""Build a preset's model the way one rank of its launch layout builds it, on the meta device, in one process.

    total = layout_parameter_total(cfg)        # the parameters of the whole model, summed from per-rank shapes

megatron's parallel_state cannot be initialised for TP = 4 in one process, so every module gets a
ProcessGroupCollection of FakeGroups whose size() / rank() are the layout's (megatron's layers split their weights
by `group.size()` / `group.rank()`); a 1-process gloo group makes megatron read them (get_pg_size returns 1 when
torch.distributed is not initialised). Weights live on the meta device (no memory; use_cpu_initialization, no
initialisation), except the few small replicated linears megafusion creates on the CPU.

Summing ranks: every pipeline stage is built (stage 0 holds the embedding, the last the heads). Within a stage,
all TP ranks hold equally shaped shards and all EP ranks equally many experts, so rank 0 stands for them: an expert
weight (megatron marks it allreduce=False) counts EP times; a weight whose shape differs from the same stage built
at TP = 1 (same padded vocabulary) is a TP shard and counts TP times (its TP = 1 shape is checked to be TP times
larger); the rest is replicated over TP and counts once. A tied LM head on the last stage (megatron marks it
shared_embedding) is a copy of the embedding and is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from distributed import free_port


class FakeGroup:
    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def fake_groups(tp: int, pp: int, ep: int, dp: int, pp_rank: int) -> ProcessGroupCollection:
    etp = tp  # megatron's expert_tensor_parallel_size defaults to TP
    sizes = dict(tp=tp, pp=pp, mp=tp * pp, embd=min(pp, 2), pos_embd=1, cp=1, tp_cp=tp, ep=ep, expt_tp=etp,
                 tp_ep=etp * ep, tp_ep_pp=etp * ep * pp, tp_dp_cp=tp * dp, dp=dp, dp_cp=dp,
                 expt_dp=dp * tp // (etp * ep), intra_dp_cp=dp, intra_expt_dp=dp * tp // (etp * ep),
                 inter_dist_opt=1, intra_dist_opt=dp)
    groups = ProcessGroupCollection(**{k: FakeGroup(v, pp_rank if k == "pp" else 0) for k, v in sizes.items()})
    groups.hcp = None
    return groups


@contextlib.contextmanager
def one_process_group():
    """A 1-rank gloo default group (unless one exists) and megafusion's CPU adaptations (the MoE dispatcher)."""
    from megafusion.parallel.cpu_compat import disable_cpu_compat, enable_cpu_compat

    created = not dist.is_initialized()
    if created:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    active = enable_cpu_compat(force=True)
    try:
        yield
    finally:
        if active:
            disable_cpu_compat()
        if created:
            dist.destroy_process_group()


def stage_shapes(cfg, stage: int, dp: int) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """name -> (shape, is_expert) of the parameters TP rank 0 / EP rank 0 of pipeline stage `stage` builds."""
    from megafusion.model.model import MultimodalModel
    from megafusion.model.transformer_config import build_transformer_config

    p = cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    model_cfg = dataclasses.replace(cfg.model, transformer_impl="local", attention_backend="dense")
    config = build_transformer_config(dataclasses.replace(cfg, model=model_cfg))
    config.perform_initialization = False
    with torch.device("meta"):
        model = MultimodalModel(config, pre_process=stage == 0, post_process=stage == pp - 1,
                                pg_collection=fake_groups(tp, pp, ep, dp, stage))
    out = {}
    for name, param in model.named_parameters():
        if stage > 0 and getattr(param, "shared_embedding", False):
            continue
        out[name] = (tuple(param.shape), not getattr(param, "allreduce", True))
    return out


def layout_parameter_total(cfg, dp: int = 1) -> int:
    """Parameters of the whole model, from per-rank shapes at cfg.parallel's layout (module docstring)."""
    p = cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    dp = max(dp, ep)
    total = 0
    with one_process_group():
        for stage in range(pp):
            shapes = stage_shapes(cfg, stage, dp)
            reference = shapes
            if tp > 1:
                from megafusion.config.schema import Config

                single = dataclasses.replace(
                    cfg, parallel=dataclasses.replace(p, tensor_model_parallel_size=1, sequence_parallel=False),
                    model=dataclasses.replace(cfg.model, make_vocab_size_divisible_by=(
                        cfg.model.make_vocab_size_divisible_by * tp)))
                assert isinstance(single, Config)
                reference = stage_shapes(single, stage, dp)
            assert set(shapes) == set(reference), set(shapes) ^ set(reference)
            for name, (shape, expert) in shapes.items():
                numel = int(torch.Size(shape).numel())
                full = int(torch.Size(reference[name][0]).numel())
                if expert:
                    total += numel * ep
                elif shape != reference[name][0]:
                    assert numel * tp == full, f"{name}: {shape} x TP {tp} is not its TP=1 shape {reference[name][0]}"
                    total += numel * tp
                else:
                    total += numel
    return total
