"""megafusion.checkpoint: distributed checkpoints (megatron dist_checkpointing) published atomically, plus the
train state (counters, scheduler, loss-weighting EMA, data position, RNG, layout, resolved config).

    save_checkpoint / load_checkpoint / resume / checkpoint_root   checkpointer.py (what the training loop calls)
    TrainState, ParallelLayout                                     train_state.py
    stage / publish / find_latest / resolve_load_dir               publish.py (the on-disk protocol)
    CheckpointLayoutError, CheckpointRefused                       the two refusals a caller may see

docs/checkpoints.md describes the folder layout and the guarantees.
"""

from megafusion.checkpoint.checkpointer import (CheckpointRefused, LoadedCheckpoint, checkpoint_root,
                                                load_checkpoint, resume, save_checkpoint)
from megafusion.checkpoint.dist_io import CheckpointLayoutError
from megafusion.checkpoint.publish import find_latest, resolve_load_dir
from megafusion.checkpoint.train_state import ParallelLayout, TrainState

__all__ = [
    "CheckpointLayoutError", "CheckpointRefused", "LoadedCheckpoint", "ParallelLayout", "TrainState",
    "checkpoint_root", "find_latest", "load_checkpoint", "resolve_load_dir", "resume", "save_checkpoint",
]
