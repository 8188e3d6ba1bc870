"""training.exit_duration_minutes: a wall-clock budget ends training with a checkpoint at an agreed step."""

import json
import os

from loop_harness import run_train


def test_exit_duration_saves_and_stops_early(tmp_path):
    records = run_train(tmp_path, "timed", ["training.train_steps=50", "training.exit_duration_minutes=0.0001",
                                            f"checkpoint.save_dir={tmp_path}/ckpt"])
    assert [r["step"] for r in records] == [1]  # the budget is spent after the first step
    assert os.path.isdir(tmp_path / "ckpt" / "iter_0000001")
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith("iter_0000001")
    record = json.loads((tmp_path / "timed" / "last_exit.json").read_text())  # what a launcher reads
    assert record["reason"] == "exit_duration" and record["saved"] and record["step"] == 1
