"""A checkpoint save that runs out of space: one line naming the folder, the partial save removed, the previous
checkpoint still `latest` and loadable. Needs a small tmpfs (root); skipped where it cannot be mounted."""

from __future__ import annotations

import json
import subprocess

import pytest

from megafusion.checkpoint.publish import is_complete, read_latest
from megafusion.cli import main

FAST = ["training.global_batch_size=4", "training.micro_batch_size=2", "data.num_workers=0",
        "logging.tensorboard=false", "optimizer.warmup_steps=0"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    # one tiny-config checkpoint is ~3.1 MB: room for the first, not for the second next to it
    if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=4500k", "tmpfs", str(mount)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.call(["umount", "-l", str(mount)])


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, small_disk, capsys):
    save_dir = small_disk / "ckpt"
    code = main(["train", "--config", "tiny", f"training.run_dir={tmp_path}/run", f"checkpoint.save_dir={save_dir}",
                 "training.train_steps=4", "checkpoint.save_interval=1", *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"megafusion train: {save_dir}: no space left on the device while saving step 2")
    assert "iter_0000001 stays `latest`" in line
    assert read_latest(save_dir).name == "iter_0000001" and is_complete(save_dir / "iter_0000001")
    assert not [p.name for p in save_dir.iterdir() if p.name.startswith("tmp.")], "the partial save is removed"
    # the run resumes from the checkpoint that was kept once there is room again
    code = main(["train", "--config", "tiny", f"training.run_dir={tmp_path}/run", f"checkpoint.save_dir={save_dir}",
                 "training.train_steps=2", "checkpoint.save_interval=0", "checkpoint.save_at_end=false", *FAST])
    assert code == 0
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2], "resumed from step 1 (steps after it dropped from the metrics, step 2 trained again)"
