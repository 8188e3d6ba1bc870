"""A skipped step never costs a checkpoint (training.nan_policy=skip): NaN latents injected on the very step a save
is due (training.exit_interval, the end of training, checkpoint.save_interval on the first step) still publish a
checkpoint holding the last good state, the log says "saved" only after the save, a resume from such a checkpoint
continues exactly like the uninterrupted run, and a save that cannot be taken (NaN weights) fails the run."""

import json
import math

import pytest
import torch

from distributed import run_distributed
from loop_harness import BASE
from megafusion.checkpoint.publish import list_published, read_marker
from megafusion.checkpoint.train_state import read_train_state

KEYS = ("loss", "loss_ce", "loss_fm", "grad_norm", "lr")


def _nan_worker(rank, world_size, overrides, nan_steps, poison_weights, out_file):
    import logging

    from megafusion.config import load_config
    from megafusion.training import forward_step, loop

    log_lines = []
    handler = logging.Handler()
    handler.emit = lambda record: log_lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    current = {"step": 0}
    original_loss = forward_step._loss_func

    def poisoned(batch, weighting, output):  # NaN latents: the flow-matching term of this step is NaN
        loss, report = original_loss(batch, weighting, output)
        if current["step"] in nan_steps:
            loss = loss * float("nan")
            report["loss_fm"] = report["loss_fm"] * float("nan")
        return loss, report

    original_step = loop.Trainer.train_step

    def train_step(self):
        current["step"] = self.state.step + 1
        values = original_step(self)
        if poison_weights and current["step"] in nan_steps:
            with torch.no_grad():  # a fault the guard cannot undo: the weights themselves went bad
                next(self.model[0].parameters()).view(-1)[0] = float("nan")
        return values

    forward_step._loss_func = poisoned
    loop.Trainer.train_step = train_step
    result = {}
    try:
        result["records"] = loop.train(load_config("tiny", overrides))
    except Exception as e:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(e).__name__}: {e}"
    result["log"] = log_lines
    with open(out_file, "w") as f:
        json.dump(result, f)


def _run(tmp_path, name, overrides, nan_steps, poison_weights=False):
    out = str(tmp_path / f"{name}.json")
    args = BASE + [f"training.run_dir={tmp_path / name}", "training.nan_policy=skip", *overrides]
    run_distributed(_nan_worker, 1, args=(args, set(nan_steps), poison_weights, out))
    with open(out) as f:
        return json.load(f)


def _published(root):
    return [p.name for _, p in list_published(root)]


def test_save_due_on_a_skipped_step_is_taken_and_resumes_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["training.train_steps=4", f"checkpoint.save_dir={ckpt}", "checkpoint.keep_last=5"]
    straight = _run(tmp_path, "straight", ["training.train_steps=4"], nan_steps={2, 4})["records"]
    assert [r["skipped_steps"] for r in straight] == [0, 1, 1, 2]

    # exit_interval falls due on step 2, which is skipped: the checkpoint is still written
    first = _run(tmp_path, "first", common + ["training.exit_interval=2"], nan_steps={2})
    assert "error" not in first, first.get("error")
    assert [r["step"] for r in first["records"]] == [1, 2]
    assert _published(ckpt) == ["iter_0000002"]
    saved = read_train_state(ckpt / "iter_0000002").train_state  # the counters of the skipped step
    assert (saved.step, saved.skipped_steps, saved.consumed_samples) == (2, 1, 8)
    exit_line = [line for line in first["log"] if "stop requested by training.exit_interval" in line]
    assert exit_line == ["stop requested by training.exit_interval at step 2: checkpoint saved; exiting"]
    saved_at = [i for i, line in enumerate(first["log"]) if line.startswith("saved checkpoint")]
    assert saved_at and saved_at[0] < first["log"].index(exit_line[0])  # "saved" only after the save

    # resume from the skipped step's checkpoint; the last step (save_at_end) is skipped too and still saved
    second = _run(tmp_path, "second", common + ["checkpoint.load=auto", "checkpoint.save_at_end=true"],
                  nan_steps={4})
    assert "error" not in second, second.get("error")
    records = second["records"]
    assert [r["step"] for r in records] == [3, 4]
    for x, y in zip(straight[2:], records):
        for key in KEYS:
            assert x[key] == y[key] or (math.isnan(x[key]) and math.isnan(y[key])), (key, x["step"], x[key], y[key])
    assert records[-1]["skipped_steps"] == 2
    assert _published(ckpt) == ["iter_0000002", "iter_0000004"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert read_marker(ckpt / "iter_0000004")["step"] == 4


def test_skipped_first_step_saves_without_optimizer_and_loads(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = [f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1", "training.train_steps=2"]
    first = _run(tmp_path, "first", common + ["training.exit_interval=1"], nan_steps={1})
    assert "error" not in first, first.get("error")
    assert _published(ckpt) == ["iter_0000001"]
    assert read_marker(ckpt / "iter_0000001")["optimizer_format"] is None  # no update was ever applied
    second = _run(tmp_path, "second", common, nan_steps=set())
    assert "error" not in second, second.get("error")
    assert [r["step"] for r in second["records"]] == [2]
    assert second["records"][0]["skipped_steps"] == 1
    assert _published(ckpt)[-1] == "iter_0000002"


def test_unsaveable_state_on_a_skipped_step_fails_the_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = _run(tmp_path, "bad", [f"checkpoint.save_dir={ckpt}", "training.train_steps=2",
                                    "training.exit_interval=2"], nan_steps={2}, poison_weights=True)
    assert result["error"].startswith("CheckpointRefused: not saving step 2: model weights hold NaN/Inf")
    assert not ckpt.exists() or not _published(ckpt)
    assert not any("stop requested" in line for line in result["log"])  # no claim of a save that did not happen


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_guard_allows_a_save_after_a_skip_never_after_a_halt(policy):
    from megafusion.checkpoint.checkpointer import CheckpointRefused
    from megafusion.training.nan_guard import NanGuard, NonFiniteError

    guard = NanGuard(policy)
    assert guard.check(1, {"fm": 1.0}, 1.0)
    guard.assert_checkpoint_allowed(1)
    if policy == "skip":
        assert not guard.check(2, {"fm": float("nan")}, 1.0)
        guard.assert_checkpoint_allowed(2)  # the state is the last good one
    else:
        with pytest.raises(NonFiniteError):
            guard.check(2, {"fm": float("nan")}, 1.0)
        with pytest.raises(CheckpointRefused, match="nan_policy=halt"):
            guard.assert_checkpoint_allowed(2)
