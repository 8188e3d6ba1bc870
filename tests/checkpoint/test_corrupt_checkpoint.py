"""A corrupt published checkpoint is caught before torch reads it: the completion marker records every file's size,
a truncated shard fails the load with an error naming the file and the previous complete checkpoint (one line from
`megafusion train`, exit 1), older markers without sizes still load, and keep_last counts publication order so the
checkpoint just written is never removed."""

import json
import os
import subprocess
import sys

import pytest

from megafusion.checkpoint import publish
from megafusion.checkpoint.publish import COMPLETE_MARKER, CorruptCheckpointError, check_files, list_published

TRAIN = ["training.global_batch_size=4", "training.micro_batch_size=2", "data.num_workers=0",
         "logging.tensorboard=false", "optimizer.warmup_steps=1", "checkpoint.save_at_end=false"]


def _save(root, step, keep_last=5, payload="x"):
    staging = publish.stage(root, step)
    (staging / "shard.bin").write_text(payload)
    (staging / "rng").mkdir()
    (staging / "rng" / "rank_00000.pt").write_text("rng")
    return publish.publish(root, step, keep_last, marker={"note": "test"})


def test_marker_records_sizes_and_check_names_the_bad_file(tmp_path):
    first, second = _save(tmp_path, 1), _save(tmp_path, 2, payload="longer")
    assert publish.read_marker(second)[publish.FILES_KEY] == {"rng/rank_00000.pt": 3, "shard.bin": 6}
    assert check_files(second) is None
    (second / "shard.bin").write_text("cut")
    assert check_files(second) == f"{second / 'shard.bin'} has 3 bytes, 6 were written (truncated or overwritten " \
                                  f"after the save)"
    assert publish.previous_complete(second) == first
    (first / "rng" / "rank_00000.pt").unlink()  # the previous one is damaged too: nothing to offer
    assert check_files(first) == f"{first / 'rng' / 'rank_00000.pt'} is missing"
    assert publish.previous_complete(second) is None
    assert "start fresh with checkpoint.load=none" in publish.corrupt_message(second, "x")


def test_marker_without_sizes_is_not_checked(tmp_path):
    final = _save(tmp_path, 3)
    marker = publish.read_marker(final)
    del marker[publish.FILES_KEY]  # written before sizes were recorded
    (final / COMPLETE_MARKER).write_text(json.dumps(marker))
    (final / "shard.bin").write_text("anything")
    assert check_files(final) is None


def test_keep_last_counts_publication_order_and_keeps_the_new_checkpoint(tmp_path):
    _save(tmp_path, 100)
    _save(tmp_path, 200)  # an older run got further
    new = _save(tmp_path, 1, keep_last=1)
    assert [p for _, p in list_published(tmp_path)] == [new]
    _save(tmp_path, 2, keep_last=2)
    assert [s for s, _ in list_published(tmp_path)] == [1, 2]
    # rolling back to an earlier checkpoint: the abandoned future goes first
    _save(tmp_path, 300, keep_last=5)
    _save(tmp_path, 3, keep_last=2)
    assert [s for s, _ in list_published(tmp_path)] == [3, 300]
    (tmp_path / publish.LATEST_FILE).unlink()  # e.g. another writer replaced it: the argument alone protects
    assert publish.prune(tmp_path, 1, just_written=tmp_path / "iter_0000300") == []
    assert publish.prune(tmp_path, 1) == [tmp_path / "iter_0000300"]


def _train(run_dir, *overrides):
    cmd = [sys.executable, "-m", "megafusion.cli", "train", "--config", "tiny", *TRAIN,
           f"training.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_truncated_shard_is_named_with_the_checkpoint_to_load_instead(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    done = _train(run_dir, "training.train_steps=2", "checkpoint.save_interval=1")
    assert done.returncode == 0, done.stderr[-3000:]
    latest, previous = root / "iter_0000002", root / "iter_0000001"
    shards = sorted(p for p in latest.iterdir() if p.suffix == ".distcp")
    assert shards, sorted(os.listdir(latest))
    recorded = publish.read_marker(latest)[publish.FILES_KEY]
    assert recorded[shards[0].name] == shards[0].stat().st_size > 0
    with open(shards[0], "r+b") as f:  # a truncated copy / a disk that lost the tail
        f.truncate(shards[0].stat().st_size // 2)

    resumed = _train(run_dir, "training.train_steps=3")  # checkpoint.load=auto picks the corrupt `latest`
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    line = resumed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"megafusion train: checkpoint {latest} is corrupt: {shards[0]} has ")
    assert f"load the previous complete checkpoint with checkpoint.load={previous}" in line
    assert "Traceback" not in resumed.stderr and "EOFError" not in resumed.stderr

    # the named way out works; a marker from before sizes were recorded (none listed) loads as it always did
    marker = publish.read_marker(previous)
    del marker[publish.FILES_KEY]
    (previous / COMPLETE_MARKER).write_text(json.dumps(marker))
    rolled_back = _train(run_dir, "training.train_steps=3", f"checkpoint.load={previous}",
                         "checkpoint.save_at_end=true")
    assert rolled_back.returncode == 0, rolled_back.stderr[-3000:]
    assert (root / "latest").read_text().strip() == "iter_0000003"


def test_corrupt_checkpoint_error_is_a_user_error():
    from megafusion.errors import user_error_line

    assert user_error_line(CorruptCheckpointError("checkpoint x is corrupt")) == "checkpoint x is corrupt"
    with pytest.raises(CorruptCheckpointError):
        raise CorruptCheckpointError("x")
