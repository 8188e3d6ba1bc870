"""No orphaned processes: a trainer killed with -9 takes its loader workers and checkpoint writers with it."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest


def _cmd(p) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited (or a zombie) meanwhile
        return ""


def _live(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone_within(procs, seconds):
    """The processes of `procs` still alive (zombies count as gone) after `seconds`."""
    deadline = time.time() + seconds
    alive = list(procs)
    while alive and time.time() < deadline:
        alive = [p for p in alive if _live(p)]
        time.sleep(0.1)
    return [f"{p.pid}: {_cmd(p)[:200]}" for p in alive if _live(p)]


@pytest.mark.distributed
def test_kill9_of_the_trainer_leaves_no_process(tmp_path):
    cmd = [sys.executable, "-m", "megafusion.cli", "train", "--config", "tiny", "training.train_steps=1000",
           "training.global_batch_size=4", "training.micro_batch_size=2", "data.num_workers=2",
           "logging.tensorboard=false", "logging.log_interval=1", "checkpoint.save_interval=2",
           "checkpoint.keep_last=1", f"checkpoint.save_dir={tmp_path}/ckpt", f"training.run_dir={tmp_path}/run"]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 240
        while "step 5/" not in log.read_text():  # two checkpoints saved: their writers have come and gone
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        children = [c for c in psutil.Process(proc.pid).children(recursive=True) if _live(c)]
        workers = [c for c in children if "megafusion.cli" in _cmd(c)]
        assert len(workers) >= 2, [_cmd(c) for c in children]  # the loader workers (forked)
        cmds = {c.pid: _cmd(c) for c in children}
        proc.kill()
        proc.wait()
        left = _gone_within(children, 5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, so the suite goes on clean
        except ProcessLookupError:
            pass
    assert not left, f"processes left after kill -9 of the trainer: {left}"
    # no spawned multiprocessing Manager (megatron's writer-results queue) among the trainer's children
    assert not [c for c in children if "multiprocessing" in cmds[c.pid] and "resource_tracker" not in cmds[c.pid]], \
        list(cmds.values())


SCRIPT = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from megafusion.utils.processes import tie_forked_children

    def helper():
        print(os.getpid(), flush=True)
        time.sleep(600)

    tie_forked_children()  # as initialize_parallel / save_sharded do before megatron forks its writers
    child = multiprocessing.get_context("fork").Process(target=helper)
    child.start()
    time.sleep(600)
""")


def test_forked_helper_dies_with_its_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        child_pid = int(proc.stdout.readline())
        child = psutil.Process(child_pid)
        time.sleep(0.2)
        assert _live(child)
        proc.kill()
        proc.wait()
        assert not _gone_within([child], 5), "the forked helper outlived its parent"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
