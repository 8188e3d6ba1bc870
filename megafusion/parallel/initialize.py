"""Process groups and seeds: `initialize_parallel(parallel_cfg, seed)` / `destroy_parallel()`.

One entry point for every launch mode:
  * torchrun / srun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) -> env:// rendezvous;
  * an already initialised default group (tests/distributed.py, notebooks) -> reused, not re-created;
  * a plain `python` process -> a 1-rank group on an in-memory store (no port to collide on).
Backend `auto` is nccl when CUDA is available, gloo otherwise. On CPU, megafusion.parallel.cpu_compat is enabled
first, so the megatron-core machinery below runs unchanged. megatron's parallel_state.initialize_model_parallel
builds the TP/PP/(virtual PP)/EP/DP groups; seeding goes through megatron's
tensor_parallel.model_parallel_cuda_manual_seed (on CPU its RNG tracker is cpu_compat's CPU tracker).

Faults: every group (the default one and megatron's) waits `parallel.timeout_minutes` for a peer before its
collective fails (`resolve_timeout_minutes`: 5 on gloo, 10 on NCCL by default), so a rank whose peer froze or
died never hangs longer; on NCCL, TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (unless set) lets the watchdog abort the
process at the timeout. A multi-rank job also starts a heartbeat (liveness.py) that names a missing peer, and
ties this process's forked helpers (loader workers, checkpoint writers) to its lifetime (utils/processes.py).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megafusion.config.schema import ParallelConfig
from megafusion.parallel.cpu_compat import enable_cpu_compat, fill_missing_te_names
from megafusion.parallel.liveness import start_monitor, stop_monitor
from megafusion.utils.processes import tie_forked_children

_OWNS_PROCESS_GROUP = False
DEFAULT_TIMEOUT_MINUTES = {"gloo": 5.0, "nccl": 10.0}


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place in the parallel layout (returned by initialize_parallel)."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    vpp_size: Optional[int]
    backend: str
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.distributed_backend=nccl needs CUDA; use gloo (or auto) on CPU")
    if name not in ("nccl", "gloo"):
        raise ValueError(f"parallel.distributed_backend={name!r} is not one of ['auto', 'nccl', 'gloo']")
    return name


def check_layout(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Validate the TP x PP x DP (x EP) layout against the world size; returns the data-parallel size."""
    p = parallel_cfg
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size ({tp}) x "
            f"parallel.pipeline_model_parallel_size ({pp}); change the sizes or the number of processes"
        )
    dp = world_size // (tp * pp)
    if dp % ep != 0:
        raise ValueError(
            f"parallel.expert_model_parallel_size={ep} must divide the data-parallel size {dp} "
            f"(world {world_size} / (tp {tp} x pp {pp}))"
        )
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 and a "
            f"value >= 1 (got pipeline_model_parallel_size={pp}); set it to null otherwise"
        )
    return dp


def resolve_timeout_minutes(parallel_cfg: ParallelConfig, backend: str) -> float:
    """parallel.timeout_minutes, or the backend's default (gloo 5, nccl 10) when it is null."""
    if parallel_cfg.timeout_minutes is not None:
        return float(parallel_cfg.timeout_minutes)
    return DEFAULT_TIMEOUT_MINUTES[backend]


def collective_device(group=None) -> torch.device:
    """Where a small tensor for a collective over `group` must live (NCCL needs the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group(backend: str, timeout_minutes: float) -> None:
    global _OWNS_PROCESS_GROUP
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():
        return
    if backend == "nccl":  # the watchdog aborts a rank stuck past the timeout instead of leaving it hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # a plain single process: in-memory store, nothing to rendezvous with
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _OWNS_PROCESS_GROUP = True


def seed_everything(seed: int) -> None:
    """Python/numpy/torch seeds plus megatron's tracked model-parallel RNG states (data-parallel, TP, EP)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_parallel(parallel_cfg: ParallelConfig, seed: int,
                        timeout_minutes: Optional[float] = None) -> ParallelInfo:
    """Process groups for `parallel_cfg`; `timeout_minutes` overrides parallel.timeout_minutes (for the groups
    created here: an existing default group keeps its own timeout)."""
    from megatron.core import parallel_state as ps

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_compat()
    fill_missing_te_names()
    if on_gpu and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = resolve_backend(parallel_cfg.distributed_backend)
    if timeout_minutes is None:
        timeout_minutes = resolve_timeout_minutes(parallel_cfg, backend)
    _init_process_group(backend, timeout_minutes)
    backend = dist.get_backend()
    world = dist.get_world_size()
    check_layout(parallel_cfg, world)
    tie_forked_children()
    p = parallel_cfg
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    start_monitor(dist.get_rank(), world)
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        vpp_size=p.virtual_pipeline_model_parallel_size,
        backend=backend,
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups, and the default group when initialize_parallel created it."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps

    stop_monitor()
    ps.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
