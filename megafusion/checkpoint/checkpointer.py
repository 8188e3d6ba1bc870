"""save_checkpoint / load_checkpoint / resume: the two calls the training loop makes, and what they guarantee.

    save_dir = checkpoint_root(cfg)
    loaded = resume(cfg, save_dir, model_chunks, optimizer, scheduler=sched, loss_weighting=weighting)
    if loaded: state, data_state = loaded.train_state, loaded.data_state      # else: a fresh start
    ...
    save_checkpoint(save_dir, state, model_chunks, optimizer, scheduler=sched, loss_weighting=weighting,
                    data_state=loader.state_dict(), config_yaml=to_yaml(cfg), keep_last=cfg.checkpoint.keep_last,
                    nan_guard=guard)

Both are collective: every rank of the world group calls them at the same step.

save_checkpoint: refuses (CheckpointRefused) when the NaN guard forbids it (a bad step under nan_policy=halt; a
step skipped under nan_policy=skip is saved: its state is the last good one) or any rank's weights are not finite;
stages `<save_dir>/tmp.iter_XXXXXXX`; writes model + optimizer through megatron dist_checkpointing (torch_dist),
every rank's RNG states, and (rank 0) train_state.pt + config.yaml; then publishes atomically (checkpoint/publish.py:
barrier, marker with file sizes, fsync, rename, `latest`, keep-last-K). A save that runs out of space removes its
staging folder and raises CheckpointWriteError naming the folder; `latest` stays the previous checkpoint.

load_checkpoint: first checks every file against the sizes the completion marker recorded (CorruptCheckpointError
naming the bad file and the previous complete checkpoint to load instead; agreed over ranks, nothing is read from a
corrupt folder); then reads train_state.pt and checks, before touching any tensor, that the optimizer state can
be resharded into the current layout (CheckpointLayoutError naming both layouts and checkpoint.load_optimizer
otherwise); then loads model weights (resharded by dist_checkpointing to the current TP/PP/EP/VP), optimizer
state (unless load_optimizer=False, which is logged), scheduler and loss-weighting state_dicts, and this rank's
RNG states (when the layout is unchanged). Returns the TrainState and the data loader's state to resume from.

Any object with state_dict() / load_state_dict() serves as scheduler or loss_weighting (megatron's
OptimizerParamScheduler, megafusion's adaptive loss weighting). The data state is an opaque picklable dict.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megafusion.checkpoint import dist_io, publish
from megafusion.checkpoint.dist_io import CheckpointLayoutError  # noqa: F401  (re-exported)
from megafusion.checkpoint.publish import CorruptCheckpointError  # noqa: F401  (re-exported)
from megafusion.checkpoint.train_state import (ParallelLayout, TrainState, load_rng, read_train_state,
                                               write_rng, write_train_state)
from megafusion.errors import RunError
from megafusion.parallel.initialize import collective_device

logger = logging.getLogger(__name__)


class CheckpointWriteError(RunError):
    """A save failed for lack of space; the partial save is removed and the previous checkpoint stays `latest`."""


FULL_DISK_BYTES = 16 << 20  # a save that failed with less free space than this ran out of it


class CheckpointRefused(RunError):
    """A checkpoint was requested for a state that must not be saved (after a bad step, non-finite weights)."""


@dataclass
class LoadedCheckpoint:
    path: Path
    """The checkpoint folder that was loaded."""
    train_state: TrainState
    """Counters to continue from (step, consumed_samples, skipped_steps, total_flops)."""
    data_state: Optional[dict]
    """The data loader's state_dict as saved (None if the run saved none)."""
    saved_layout: ParallelLayout
    """The layout the checkpoint was written with."""
    config_yaml: Optional[str]
    """The resolved config of the run that saved it."""
    optimizer_loaded: bool
    """Whether optimizer state was restored."""
    rng_restored: bool
    """Whether this rank's RNG states were restored (layout unchanged)."""


def checkpoint_root(cfg) -> Path:
    """`checkpoint.save_dir`, or `<training.run_dir>/checkpoints` when it is unset."""
    return Path(cfg.checkpoint.save_dir or Path(cfg.training.run_dir) / "checkpoints")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _local_weights_finite(model_chunks) -> bool:
    with torch.no_grad():
        for chunk in dist_io._unwrap(model_chunks):
            for p in chunk.parameters():
                if not bool(torch.isfinite(p).all()):
                    return False
    return True


def save_checkpoint(save_dir, train_state: TrainState, model_chunks, optimizer=None, *, scheduler=None,
                    loss_weighting=None, data_state: Optional[dict] = None, config_yaml: Optional[str] = None,
                    keep_last: int = 2, layout: Optional[ParallelLayout] = None, nan_guard=None,
                    optimizer_sharding: str = dist_io.DEFAULT_DISTRIBUTED_SHARDING) -> Path:
    """Collective: save and publish `<save_dir>/iter_<train_state.step>`; returns its path.

    model_chunks: the list of model chunks (one per virtual pipeline stage), wrapped or not.
    optimizer: a megatron optimizer (its sharded_state_dict is used) or None.
    nan_guard: the training.nan_guard.NanGuard of the run; its assert_checkpoint_allowed() must pass.
    optimizer_sharding: DistributedOptimizer format (dist_io.FULLY_RESHARDABLE_SHARDINGS reshard anywhere).
    """
    save_dir = Path(save_dir)
    step = int(train_state.step)
    if nan_guard is not None:
        nan_guard.assert_checkpoint_allowed(step)
    if _any_rank(not _local_weights_finite(model_chunks)):
        raise CheckpointRefused(f"not saving step {step}: model weights hold NaN/Inf on at least one rank; "
                                f"the last published checkpoint in {save_dir} stays `latest`")
    layout = layout or ParallelLayout.current()
    staging = publish.stage(save_dir, step)
    try:
        fmt = dist_io.save_sharded(staging, model_chunks, optimizer, optimizer_sharding)
        write_rng(staging, _rank())
        if _rank() == 0:
            write_train_state(
                staging, train_state, layout,
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                loss_weighting=loss_weighting.state_dict() if loss_weighting is not None else None,
                data=data_state, optimizer_format=fmt, config_yaml=config_yaml,
            )
        final = publish.publish(save_dir, step, keep_last,
                                marker={"layout": layout.to_dict(), "optimizer_format": fmt})
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        if not _disk_full(save_dir, exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)  # give back the space the partial save took
        latest = publish.read_latest(save_dir)
        raise CheckpointWriteError(
            f"{save_dir}: no space left on the device while saving step {step} "
            f"({shutil.disk_usage(save_dir).free >> 20} MiB free after removing the partial save); "
            f"{f'{latest.name} stays `latest`' if latest else 'no checkpoint was published before'}; free space "
            f"there or set checkpoint.save_dir to a larger file system") from exc
    if _rank() == 0:
        logger.info("saved checkpoint %s (layout %s)", final, layout.describe())
    return final


def _disk_full(save_dir: Path, exc: BaseException) -> bool:
    """Whether a failed save ran out of space: ENOSPC / EDQUOT anywhere in the exception chain (torch's and
    megatron's writers wrap it, sometimes only as text), or next to no space left where it was writing."""
    seen = exc
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(save_dir).free < FULL_DISK_BYTES
    except OSError:
        return False


def _restore(name: str, obj: Any, state: Optional[dict], path: Path) -> None:
    if obj is None:
        return
    if state is None:
        logger.warning("checkpoint %s holds no %s state; %s keeps its initial state", path, name, name)
        return
    if name == "scheduler" and hasattr(obj, "num_steps"):
        # megatron's OptimizerParamScheduler.load_state_dict *adds* the saved step count to its own (it expects a
        # fresh scheduler); start from 0 so loading gives exactly the saved position whatever happened before
        obj.num_steps = 0
    obj.load_state_dict(state)


def load_checkpoint(path, model_chunks, optimizer=None, *, scheduler=None, loss_weighting=None,
                    load_optimizer: bool = True, layout: Optional[ParallelLayout] = None,
                    strict: bool = True) -> LoadedCheckpoint:
    """Collective: restore a complete checkpoint folder into the live objects (see the module docstring)."""
    path = Path(path)
    if not publish.is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {publish.COMPLETE_MARKER}); partial "
                                f"checkpoints are never loaded")
    verify_files(path)
    saved = read_train_state(path)
    current = layout or ParallelLayout.current()
    want_optimizer = optimizer is not None and load_optimizer
    updates = saved.train_state.step - saved.train_state.skipped_steps
    if want_optimizer and saved.optimizer_format is None and updates == 0:
        # saved before any update (a seed checkpoint, or only skipped steps): a fresh optimizer is its exact state
        logger.info("checkpoint %s (step %d, no update applied yet) holds no optimizer state; the optimizer starts "
                    "fresh", path, saved.train_state.step)
        want_optimizer = False
    elif want_optimizer:
        if saved.optimizer_format is None:
            raise CheckpointLayoutError(f"checkpoint {path} holds no optimizer state; set "
                                        f"checkpoint.load_optimizer=false to load the model weights only")
        dist_io.check_optimizer_layout(saved.optimizer_format, saved.layout, current, path)
    elif optimizer is not None and _rank() == 0:
        logger.warning("checkpoint.load_optimizer=false: loading model weights from %s, optimizer state starts "
                       "fresh", path)
    dist_io.load_sharded(path, model_chunks, optimizer if want_optimizer else None,
                         saved.optimizer_format if want_optimizer else None, strict=strict)
    if want_optimizer:  # like megatron's --no-load-optim: weights-only loads keep this run's LR schedule
        _restore("scheduler", scheduler, saved.scheduler, path)
    _restore("loss_weighting", loss_weighting, saved.loss_weighting, path)
    rng_restored = load_rng(path, _rank(), saved.layout, current)
    if _rank() == 0:
        logger.info("loaded checkpoint %s at step %d (saved with %s, running %s)", path, saved.train_state.step,
                    saved.layout.describe(), current.describe())
    return LoadedCheckpoint(path=path, train_state=saved.train_state, data_state=saved.data,
                            saved_layout=saved.layout, config_yaml=saved.config_yaml,
                            optimizer_loaded=want_optimizer, rng_restored=rng_restored)


def verify_files(path: Path) -> None:
    """Collective: raise CorruptCheckpointError on every rank when any rank finds a file of `path` missing or not
    of the size its completion marker recorded (publish.check_files)."""
    problem = publish.check_files(path)
    if _any_rank(problem is not None):
        raise CorruptCheckpointError(publish.corrupt_message(
            path, problem or "another rank found a file missing or of the wrong size (see rank 0's error)"))


def resume(cfg, save_dir, model_chunks, optimizer=None, *, scheduler=None, loss_weighting=None,
           layout: Optional[ParallelLayout] = None) -> Optional[LoadedCheckpoint]:
    """Apply `checkpoint.load` (auto | none | a folder) and `checkpoint.load_optimizer`; None = fresh start."""
    path = publish.resolve_load_dir(cfg.checkpoint.load, Path(save_dir) if save_dir is not None else None)
    if path is None:
        return None
    return load_checkpoint(path, model_chunks, optimizer, scheduler=scheduler, loss_weighting=loss_weighting,
                           load_optimizer=cfg.checkpoint.load_optimizer, layout=layout)
