"""One run per run folder: a live holder's lock refuses a second `megafusion train` naming the holder, a kill -9'd
holder (whose forked child lives on) leaves the folder free; a fresh run over another run's checkpoints is refused
unless checkpoint.overwrite=true, and then keep_last removes the old run's higher-numbered checkpoints, never the
new one; after a resume metrics.jsonl and TensorBoard hold each step once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from loop_harness import BASE, run_train
from megafusion.checkpoint import publish
from megafusion.training.metrics import drop_steps_after

HOLDER = """
import os, sys, time
from megafusion.training.run_folder import RunFolderLock
lock = RunFolderLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # like a loader worker the trainer forked: it must not keep the folder locked
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def _train_cli(run_dir, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "megafusion.cli", "train", "--config", "tiny", *BASE, "training.train_steps=2",
           f"training.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_live_holder_refuses_a_second_run_and_kill9_frees_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())  # the lock is held from here on
        refused = _train_cli(run_dir)
        assert refused.returncode == 1, refused.stderr[-3000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith(f"megafusion train: training.run_dir={run_dir} is in use by another run: ")
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in line and "UTC" in line
        assert "Traceback" not in refused.stderr
        assert not (run_dir / "checkpoints").exists()

        os.kill(holder.pid, signal.SIGKILL)  # crashes; its forked child is still alive
        holder.wait()
        os.kill(child, 0)
        done = _train_cli(run_dir, "checkpoint.save_at_end=true")
        assert done.returncode == 0, done.stderr[-3000:]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(50):  # reaped by init once its parent died; wait until it is gone
                try:
                    os.kill(child, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def test_same_process_cannot_hold_a_folder_twice(tmp_path):
    from megafusion.training.run_folder import RunFolderBusy, RunFolderLock

    first = RunFolderLock(tmp_path).acquire()
    try:
        try:
            RunFolderLock(tmp_path).acquire()
            raise AssertionError("a second claim from the same process was accepted")
        except RunFolderBusy as e:
            assert "already used by a run in this process" in str(e)
    finally:
        first.release()
    RunFolderLock(tmp_path).acquire().release()  # free again after release


def _old_run_checkpoint(root, step):
    staging = publish.stage(root, step)
    (staging / "shard.bin").write_text("another run")
    return publish.publish(root, step, 5, marker={"note": "older run"})


def test_fresh_run_over_checkpoints_needs_overwrite_and_keeps_its_own(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    _old_run_checkpoint(root, 100)  # an older run reached higher iteration numbers
    refused = _train_cli(run_dir, "checkpoint.load=none")
    assert refused.returncode == 1, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert f"checkpoint.load=none starts a fresh run, but {root} already holds 1 checkpoint(s)" in line
    assert "checkpoint.load=auto" in line and "checkpoint.overwrite=true" in line
    assert [p.name for _, p in publish.list_published(root)] == ["iter_0000100"]

    done = _train_cli(run_dir, "checkpoint.load=none", "checkpoint.overwrite=true", "checkpoint.save_interval=1",
                      "checkpoint.keep_last=1")
    assert done.returncode == 0, done.stderr[-3000:]
    # keep_last=1 keeps the checkpoint just written, not the old run's higher-numbered one
    assert [p.name for _, p in publish.list_published(root)] == ["iter_0000002"]
    assert (root / "latest").read_text().strip() == "iter_0000002"


def test_resume_logs_each_step_once(tmp_path):
    ckpt = [f"checkpoint.save_dir={tmp_path}/ckpt", "checkpoint.save_interval=2", "logging.tensorboard=true"]
    run_train(tmp_path, "run", ckpt + ["training.train_steps=3"])  # logs 1, 2, 3; its checkpoint is step 2
    run_train(tmp_path, "run", ckpt + ["training.train_steps=4"])  # load=auto: resumes at 2, redoes 3, then 4
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")][2] == json.loads(lines[2])["loss"]


def test_drop_steps_after_rewrites_without_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # killed mid-line
    assert drop_steps_after(str(path), 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert drop_steps_after(str(path), 2) == 0 and drop_steps_after(str(tmp_path / "none.jsonl"), 0) == 0
