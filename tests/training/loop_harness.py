"""Run `megafusion train` in fresh gloo processes and collect the per-step records of rank 0.

Parallel layouts start from the same weights: a single-process run with training.train_steps=0 writes a seed
checkpoint, and every run loads it (checkpoint.load=<folder>, dist_checkpointing reshards to the layout).
"""

from __future__ import annotations

import json
import os

from distributed import run_distributed

BASE = [
    "training.train_steps=3",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "data.num_workers=0",
    "logging.tensorboard=false",
    "optimizer.warmup_steps=1",
    "checkpoint.save_at_end=false",
]


def _train_worker(rank, world_size, overrides, out_file):
    from megafusion.config import load_config
    from megafusion.training.loop import train

    records = train(load_config("tiny", overrides))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(records, f)


def run_train(tmp_path, name, overrides, world_size=1):
    out = os.path.join(str(tmp_path), f"{name}.json")
    run_dir = os.path.join(str(tmp_path), name)
    run_distributed(_train_worker, world_size, args=(BASE + [f"training.run_dir={run_dir}"] + list(overrides), out))
    with open(out) as f:
        return json.load(f)


def assert_same(reference, candidate, keys, rel=1e-5):
    """Per-step records of two runs agree on `keys` (three steps each)."""
    import pytest

    assert len(reference) == len(candidate) == 3
    for ref, got in zip(reference, candidate):
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=rel, abs=1e-7), (key, ref["step"], ref[key], got[key])


def seed_checkpoint(tmp_path, overrides=()):
    """Write the initial weights once (single process) and return the folder to load them from."""
    save_dir = os.path.join(str(tmp_path), "seed")
    run_train(tmp_path, "seed_run", ["training.train_steps=0", "checkpoint.save_at_end=true",
                                     f"checkpoint.save_dir={save_dir}", *overrides])
    return os.path.join(save_dir, "iter_0000000")
