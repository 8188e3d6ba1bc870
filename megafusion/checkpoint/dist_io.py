"""Model and optimizer tensors through megatron dist_checkpointing (torch_dist format), and layout compatibility.

    save_sharded(folder, model_chunks, optimizer, optimizer_sharding)      collective
    load_sharded(folder, model_chunks, optimizer, strict)                   collective
    optimizer_format(optimizer, optimizer_sharding) -> str                  what a save records
    check_optimizer_layout(fmt, saved_layout, current_layout, folder)       raises CheckpointLayoutError

The sharded state dict is megatron's: `{"model": chunk.sharded_state_dict()}` for one chunk, or
`{"model0": ..., "model1": ...}` for virtual-pipeline chunks (each built with its vp rank set), plus
`{"optimizer": optimizer.sharded_state_dict(model_sd, is_loading, metadata)}`. Wrappers (megatron DDP,
Float16Module) are unwrapped first. Sharded tensors are keyed by global names and offsets, so model weights load
into any TP / PP / EP / VP layout: dist_checkpointing reads each rank's slice of the full tensor.

Optimizer state formats (recorded in train_state.pt, checked before anything is loaded):
  param_space                      a non-distributed megatron optimizer (FP32Optimizer, Float16Optimizer...):
                                   per-parameter state stored as sharded tensors keyed like the model's, so it
                                   reshards across TP / PP / EP / DP like the weights.
  param_space_unstepped            the same before its first step: no tensors; restored as a fresh optimizer.
  distributed:fully_reshardable    DistributedOptimizer, canonical per-parameter state (megatron 0.16.1 default
  distributed:fully_sharded_model_space   fully reshardable formats): reshards across every layout.
  distributed:dp_reshardable       DistributedOptimizer buffers as saved; megatron reshards them across DP only,
  distributed:dp_zero_gather_scatter      so a changed TP / PP / EP / VP layout is refused up front with
                                   CheckpointLayoutError naming both layouts and checkpoint.load_optimizer=false.

DistributedOptimizer on torch's Adam (no Apex / Transformer Engine) needs three megatron-core 0.16.1 adaptations,
active only then: _prepare_fresh_distributed_optimizer, _step_tolerant_param_state_load, _unshare_adam_steps.

Writer processes: megatron's torch_dist save forks writer processes at every save; `save_sharded` ties them to
this process (they die with it, even under kill -9: utils/processes.py) and replaces the spawned multiprocessing
Manager megatron would start once to collect their results by an in-process queue (_results_in_process).
"""

from __future__ import annotations

import contextlib
import logging
import queue
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from megafusion.checkpoint.train_state import ParallelLayout
from megafusion.utils.processes import tie_forked_children

logger = logging.getLogger(__name__)

PARAM_SPACE = "param_space"
PARAM_SPACE_UNSTEPPED = "param_space_unstepped"
DISTRIBUTED_PREFIX = "distributed:"
DEFAULT_DISTRIBUTED_SHARDING = "fully_reshardable"
FULLY_RESHARDABLE_SHARDINGS = ("fully_reshardable", "fully_sharded_model_space")
DP_ONLY_SHARDINGS = ("dp_reshardable", "dp_zero_gather_scatter")


class CheckpointLayoutError(RuntimeError):
    """A checkpoint cannot be loaded into the current parallel layout as requested."""


# ---------------------------------------------------------------------------------------------- model
def _unwrap(model_chunks) -> List[torch.nn.Module]:
    from megatron.core.utils import unwrap_model

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if not chunks:
        raise ValueError("model_chunks is empty: pass the list of model chunks the training loop built")
    return unwrap_model(chunks)


@contextlib.contextmanager
def _vp_rank(index: Optional[int]) -> Iterator[None]:
    """Set megatron's virtual pipeline rank while a chunk builds its sharded state dict (restored after)."""
    if index is None:
        yield
        return
    from megatron.core import parallel_state as ps

    previous = ps.get_virtual_pipeline_model_parallel_rank()
    ps.set_virtual_pipeline_model_parallel_rank(index)
    try:
        yield
    finally:
        ps.set_virtual_pipeline_model_parallel_rank(previous)


def model_sharded_state_dict(model_chunks) -> dict:
    """megatron's sharded state dict of every model chunk: {"model": ...} or {"model0": ..., "model1": ...}."""
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    out = {}
    for i, chunk in enumerate(chunks):
        with _vp_rank(i):
            out[f"model{i}"] = chunk.sharded_state_dict()
    return out


def _load_model(model_chunks, loaded: dict, strict: bool) -> None:
    chunks = _unwrap(model_chunks)
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=strict)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=strict)


# ---------------------------------------------------------------------------------------------- optimizer
def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(optimizer, ChainedOptimizer):
        return any(isinstance(o, DistributedOptimizer) for o in optimizer.chained_optimizers)
    return isinstance(optimizer, DistributedOptimizer)


def optimizer_format(optimizer, optimizer_sharding: str = DEFAULT_DISTRIBUTED_SHARDING) -> Optional[str]:
    """The optimizer-state format a save with this optimizer records (None: no optimizer saved)."""
    if optimizer is None:
        return None
    if not hasattr(optimizer, "sharded_state_dict"):
        raise TypeError(f"optimizer {type(optimizer).__name__} has no sharded_state_dict(): pass a megatron "
                        "optimizer (megatron.core.optimizer.get_megatron_optimizer) or optimizer=None")
    if _is_distributed_optimizer(optimizer):
        if optimizer_sharding not in FULLY_RESHARDABLE_SHARDINGS + DP_ONLY_SHARDINGS:
            raise ValueError(f"optimizer_sharding={optimizer_sharding!r} is not one of "
                             f"{list(FULLY_RESHARDABLE_SHARDINGS + DP_ONLY_SHARDINGS)}")
        return DISTRIBUTED_PREFIX + optimizer_sharding
    return PARAM_SPACE_UNSTEPPED if _never_stepped(optimizer) else PARAM_SPACE


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _never_stepped(optimizer) -> bool:
    """A non-distributed megatron optimizer whose torch optimizer holds no state yet (before the first step).

    megatron-core 0.16.1 saves no tensors for it (optim_state_to_sharding_state walks the empty state) but its
    loading state dict expects moments (init_state_fn), and a restored step 0 is not saved at all; so an unstepped
    optimizer is recorded as such and restored as a fresh one, which is exactly its state."""
    return all(len(o.optimizer.state) == 0 for o in _inner_optimizers(optimizer) if o.optimizer is not None)


def _is_param_space(fmt: Optional[str]) -> bool:
    return fmt in (PARAM_SPACE, PARAM_SPACE_UNSTEPPED)


def _optimizer_metadata(fmt: str) -> dict:
    """The metadata megatron's optimizer.sharded_state_dict reads; identical at save and load."""
    metadata = {"chained_optim_avoid_prefix": True}
    if fmt.startswith(DISTRIBUTED_PREFIX):
        metadata["distrib_optim_sharding_type"] = fmt[len(DISTRIBUTED_PREFIX):]
    return metadata


def expert_optimizer_split_changes(saved: ParallelLayout, current: ParallelLayout) -> bool:
    """megatron-core 0.16.1 gives expert parameters an optimizer of their own (a ChainedOptimizer of two) only when
    expert_model_parallel_size > 1 (their `allreduce` flag, tensor_parallel/layers.py and moe/experts.py), and its
    ChainedOptimizer.load_state_dict needs the saved number of optimizers: state saved at EP = 1 does not load at
    EP > 1, nor the other way (EP 2 <-> 4 does)."""
    return (saved.ep > 1) != (current.ep > 1)


def optimizer_reshardable(fmt: Optional[str], saved: ParallelLayout, current: ParallelLayout) -> bool:
    """Whether optimizer state saved in format `fmt` under `saved` loads into `current`."""
    if fmt is not None and expert_optimizer_split_changes(saved, current):
        return False
    if fmt is None or _is_param_space(fmt):
        return True
    sharding = fmt[len(DISTRIBUTED_PREFIX):]
    if sharding in FULLY_RESHARDABLE_SHARDINGS:
        return True
    model_parallel = lambda l: (l.tp, l.pp, l.ep, l.vp or 1)  # noqa: E731
    return model_parallel(saved) == model_parallel(current)


def check_optimizer_layout(fmt: Optional[str], saved: ParallelLayout, current: ParallelLayout,
                           folder: Path) -> None:
    """Raise CheckpointLayoutError (before anything is loaded) when the optimizer state cannot be resharded."""
    if optimizer_reshardable(fmt, saved, current):
        return
    if expert_optimizer_split_changes(saved, current):
        raise CheckpointLayoutError(
            f"checkpoint {folder} was saved with layout {saved.describe()}, this run's is {current.describe()}: "
            f"megatron-core keeps expert parameters in an optimizer of their own only when "
            f"expert_model_parallel_size > 1, so optimizer state does not move between EP = 1 and EP > 1. Set "
            f"checkpoint.load_optimizer=false to load the model weights (resharded to this layout) and start the "
            f"optimizer state fresh, or keep EP on the same side of 1 (EP 2 <-> 4 loads the optimizer too)")
    raise CheckpointLayoutError(
        f"checkpoint {folder} was saved with layout {saved.describe()} and optimizer state format {fmt!r}, "
        f"which megatron-core reshards across data-parallel size only; this run's layout is "
        f"{current.describe()}. Either run with the saved tp/pp/ep/vp sizes, or set "
        f"checkpoint.load_optimizer=false to load the model weights (resharded) and start the optimizer "
        f"state fresh. Save with a fully reshardable format ({', '.join(FULLY_RESHARDABLE_SHARDINGS)}) to "
        f"avoid this."
    )


def _torch_adam_fallback() -> bool:
    """True when megatron's DistributedOptimizer runs on torch's Adam (neither Apex nor Transformer Engine)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _prepare_fresh_distributed_optimizer(optimizer) -> None:
    """Give a DistributedOptimizer that has not stepped yet its state tensors, so it can build a sharded state
    dict (to save a step-0 checkpoint, or to load into).

    megatron-core 0.16.1 with torch Adam: DistributedOptimizer.state_dict() reads each param's `step` and fails on
    a fresh optimizer. megatron's own remedy, `_init_optimizer_states_with_dummy_values` (one step on zero
    gradients), runs with lr = weight_decay = 0 so no parameter moves, and the step counters are reset to 0: the
    state is then exactly what torch Adam creates lazily (zero moments, step 0)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not _torch_adam_fallback():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or len(opt.optimizer.state) > 0:
            continue
        saved = [(g, g.get("lr"), g.get("weight_decay")) for g in opt.optimizer.param_groups]
        for group, _, _ in saved:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        try:
            opt._init_optimizer_states_with_dummy_values()
        finally:
            for group, lr, wd in saved:
                group["lr"], group["weight_decay"] = lr, wd
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.zeros_like(state["step"])


@contextlib.contextmanager
def _step_tolerant_param_state_load() -> Iterator[None]:
    """megatron-core 0.16.1 with torch Adam: DistributedOptimizer.load_state_dict puts a shared `step` tensor into
    every param's state, then load_parameter_state_from_fully_reshardable / _from_fs_model_space skip `step` in
    the loaded tensors while `_set_main_param_and_optimizer_states` copies every key of the destination state, so
    the load dies with KeyError 'step' (fully_reshardable, fully_sharded_model_space), or copies a placeholder
    step over the restored one (dp_reshardable). While a load runs, the step restored by load_state_dict from the
    saved param_groups is set aside around that copy and put back. No-op with Apex / Transformer Engine (their Adam keeps step per group)."""
    if not _torch_adam_fallback():
        yield
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"]

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        # the step restored from param_groups by load_state_dict is authoritative; a `step` among the loaded
        # tensors (dp_reshardable) is the pre-load placeholder
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1 with torch Adam: DistributedOptimizer.load_state_dict gives every param the *same*
    `step` tensor, and torch Adam increments each param's step in place, so the next update would count one step
    per parameter and get Adam's bias correction wrong. Give each param its own copy."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not _torch_adam_fallback():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()


# ---------------------------------------------------------------------------------------------- save / load
def _sharded_state_dict(model_chunks, optimizer, fmt: Optional[str], is_loading: bool) -> dict:
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None and fmt is not None and fmt != PARAM_SPACE_UNSTEPPED:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=_optimizer_metadata(fmt))
    return state


def save_sharded(folder: Path, model_chunks, optimizer=None,
                 optimizer_sharding: str = DEFAULT_DISTRIBUTED_SHARDING) -> Optional[str]:
    """Collective: write model (+ optimizer) sharded tensors into `folder` (must exist, empty); returns the
    optimizer format recorded."""
    from megatron.core import dist_checkpointing

    fmt = optimizer_format(optimizer, optimizer_sharding)
    if optimizer is not None:
        _prepare_fresh_distributed_optimizer(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, fmt, is_loading=False)
    tie_forked_children()
    _results_in_process()
    dist_checkpointing.save(state, str(folder), content_metadata={"megafusion_optimizer_format": fmt})
    return fmt


def _results_in_process() -> None:
    """megatron-core 0.16.1's FileSystemWriterAsync collects its writers' results in a queue it creates once per
    process through a *spawned* multiprocessing Manager: a server process (a fresh interpreter importing the main
    module, ~300 MB) that lives as long as the trainer and is orphaned when the trainer is killed. megafusion saves
    synchronously: the writers report through their own fork-context queues to the saving process, which is also
    the one that reads the collected results, so a plain in-process queue does the same with no extra process.
    The target's shape is checked by tests/checkpoint/test_megatron_targets.py."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def load_sharded(folder: Path, model_chunks, optimizer=None, optimizer_fmt: Optional[str] = None,
                 strict: bool = True) -> None:
    """Collective: load model weights (and optimizer state when `optimizer` and `optimizer_fmt` are given) from
    `folder` into the live objects, resharding to the current layout."""
    from megatron.core import dist_checkpointing

    if optimizer is not None and optimizer_fmt is None:
        raise ValueError(f"checkpoint {folder} holds no optimizer state; load with load_optimizer=False")
    if optimizer is not None:
        current_fmt = optimizer_format(optimizer, _sharding_of(optimizer_fmt))
        if _is_param_space(current_fmt) != _is_param_space(optimizer_fmt):
            raise CheckpointLayoutError(
                f"checkpoint {folder} holds optimizer state in format {optimizer_fmt!r} but this run's optimizer "
                f"is {type(optimizer).__name__} ({current_fmt!r}); match parallel.use_distributed_optimizer to "
                f"the saved run or set checkpoint.load_optimizer=false")
    fmt = optimizer_fmt if optimizer is not None else None
    if optimizer is not None:
        _prepare_fresh_distributed_optimizer(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, fmt, is_loading=True)
    loaded = dist_checkpointing.load(state, str(folder))
    _load_model(model_chunks, loaded, strict)
    if optimizer is not None and optimizer_fmt == PARAM_SPACE_UNSTEPPED:
        for inner in _inner_optimizers(optimizer):
            if inner.optimizer is not None:
                inner.optimizer.state.clear()  # saved before its first step: fresh is the saved state
    elif optimizer is not None:
        # no_grad: megatron's dp_reshardable load copies into main params that, for fp32 models, are views of
        # the (grad-requiring) model params
        with _step_tolerant_param_state_load(), torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)


def _sharding_of(fmt: Optional[str]) -> str:
    if fmt and fmt.startswith(DISTRIBUTED_PREFIX):
        return fmt[len(DISTRIBUTED_PREFIX):]
    return DEFAULT_DISTRIBUTED_SHARDING

