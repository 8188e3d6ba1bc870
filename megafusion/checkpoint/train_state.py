"""Everything a checkpoint holds besides model and optimizer tensors: counters, the parallel layout, RNG states.

Files inside a checkpoint folder (written into the staging folder before it is published):

    train_state.pt        rank 0: TrainState counters, scheduler / loss-weighting / data state_dicts, layout
    config.yaml           rank 0: the resolved config, human-readable
    rng/rank_XXXXX.pt     every rank: python, numpy, torch CPU (+ CUDA when present) generator states, and
                          megatron's model-parallel RNG tracker states when it is initialised

`ParallelLayout` names the layout a checkpoint was saved with (tp, pp, ep, dp, vp sizes, world size); load
compares it with the current one. RNG states are restored only when the world size and layout are unchanged
(a rank's stream has no meaning in another layout); otherwise a warning says they were re-seeded from config.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
RNG_DIR = "rng"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Counters the training loop owns and a checkpoint restores."""

    step: int = 0
    """Optimizer steps completed (skipped NaN steps included: the data they consumed is not replayed)."""
    consumed_samples: int = 0
    """Global sequences consumed so far: the data position to resume from."""
    skipped_steps: int = 0
    """Steps whose update the NaN guard skipped."""
    total_flops: float = 0.0
    """Model FLOPs spent so far (training.flops.flops_per_step summed), for FLOPs-budgeted runs."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainState":
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout of a run: what a checkpoint was saved with."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    vp: Optional[int] = None
    world_size: int = 1

    @classmethod
    def current(cls) -> "ParallelLayout":
        """Read the layout from megatron's parallel_state (single process defaults when it is not initialized)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                return cls(
                    tp=ps.get_tensor_model_parallel_world_size(),
                    pp=ps.get_pipeline_model_parallel_world_size(),
                    ep=ps.get_expert_model_parallel_world_size(),
                    dp=ps.get_data_parallel_world_size(),
                    vp=ps.get_virtual_pipeline_model_parallel_world_size(),
                    world_size=world,
                )
        except ImportError:
            pass
        return cls(dp=world, world_size=world)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ParallelLayout":
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})

    def describe(self) -> str:
        vp = f", vp={self.vp}" if self.vp else ""
        return f"tp={self.tp}, pp={self.pp}, ep={self.ep}, dp={self.dp}{vp} (world size {self.world_size})"


@dataclass
class SavedTrainState:
    """What `read_train_state` returns: the rank-0 part of a checkpoint."""

    train_state: TrainState
    layout: ParallelLayout
    scheduler: Optional[dict] = None
    loss_weighting: Optional[dict] = None
    data: Optional[dict] = None
    optimizer_format: Optional[str] = None
    config_yaml: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _write_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_train_state(folder: Path, state: TrainState, layout: ParallelLayout, *, scheduler: Optional[dict],
                      loss_weighting: Optional[dict], data: Optional[dict], optimizer_format: Optional[str],
                      config_yaml: Optional[str]) -> None:
    """Rank 0 only: write train_state.pt (and config.yaml when given) into `folder`."""
    body = {
        "format_version": FORMAT_VERSION,
        "train_state": state.to_dict(),
        "layout": layout.to_dict(),
        "scheduler": scheduler,
        "loss_weighting": loss_weighting,
        "data": data,
        "optimizer_format": optimizer_format,
        "config_yaml": config_yaml,
    }
    _write_torch(body, Path(folder) / TRAIN_STATE_FILE)
    if config_yaml is not None:
        with open(Path(folder) / CONFIG_FILE, "w") as f:
            f.write(config_yaml)
            f.flush()
            os.fsync(f.fileno())


def read_train_state(folder: Path) -> SavedTrainState:
    path = Path(folder) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a megafusion checkpoint")
    body = torch.load(path, map_location="cpu", weights_only=False)
    if body.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {body.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}")
    return SavedTrainState(
        train_state=TrainState.from_dict(body["train_state"]),
        layout=ParallelLayout.from_dict(body["layout"]),
        scheduler=body.get("scheduler"),
        loss_weighting=body.get("loss_weighting"),
        data=body.get("data"),
        optimizer_format=body.get("optimizer_format"),
        config_yaml=body.get("config_yaml"),
    )


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> Dict[str, Any]:
    """This rank's generator states: python, numpy, torch CPU, and CUDA (+ megatron's tracker) when present."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _megatron_tracker()
    if tracker is not None:
        # megatron's named model-parallel streams (dropout / init under tensor parallelism): CUDA generator states
        # on GPU, CPU generator states under megafusion.parallel.cpu_compat's tracker
        state["megatron_tracker"] = tracker.get_states()
    return state


def _megatron_tracker():
    """megatron's RNG tracker when model_parallel_cuda_manual_seed initialised it, else None."""
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _megatron_tracker()
        if tracker is None:
            raise RuntimeError("the checkpoint holds megatron RNG tracker states but this process has no initialised "
                               "tracker: load after megafusion.parallel.initialize_parallel (which seeds it)")
        tracker.set_states(state["megatron_tracker"])


def rng_path(folder: Path, rank: int) -> Path:
    return Path(folder) / RNG_DIR / f"rank_{rank:05d}.pt"


def write_rng(folder: Path, rank: int) -> None:
    """Every rank: write this rank's RNG states."""
    path = rng_path(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_torch(capture_rng_state(), path)


def load_rng(folder: Path, rank: int, saved: ParallelLayout, current: ParallelLayout) -> bool:
    """Restore this rank's RNG states when the layout is unchanged; returns whether they were restored."""
    path = rng_path(folder, rank)
    if saved != current:
        logger.warning("RNG states not restored: checkpoint %s was saved with layout %s, this run is %s; "
                       "generators keep their seeded state", folder, saved.describe(), current.describe())
        return False
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint {folder} lacks rank {rank}'s RNG states")
    restore_rng_state(torch.load(path, map_location="cpu", weights_only=False))
    return True
