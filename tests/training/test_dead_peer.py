"""Faults between ranks, injected for real on `megafusion train` processes launched srun-style (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment, env:// rendezvous): a rank killed with -9, a rank frozen (SIGSTOP) until
parallel.timeout_minutes or while its peer gets SIGTERM inside a collective, and Ctrl-C once (save and exit) or
twice (abort)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from distributed import free_port

ARGS = ["training.train_steps=1000", "training.global_batch_size=4", "training.micro_batch_size=2",
        "data.num_workers=0", "logging.tensorboard=false", "checkpoint.save_at_end=false", "logging.log_interval=1",
        "optimizer.warmup_steps=1"]


def _launch(tmp_path, world_size, overrides=()):
    """`world_size` ranks of `megafusion train`, each in its own session; returns (procs, log paths)."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                   RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        log = tmp_path / f"rank{rank}.log"
        cmd = [sys.executable, "-m", "megafusion.cli", "train", "--config", "tiny", *ARGS,
               f"training.run_dir={tmp_path}/run", *overrides]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        logs.append(log)
    return procs, logs


def _wait_for_step(procs, log, step, timeout=240):
    deadline = time.time() + timeout
    while f"step {step}/" not in log.read_text():
        for p in procs:
            assert p.poll() is None, f"a rank exited early ({p.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"never reached step {step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _exit_within(proc, seconds):
    start = time.time()
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {proc.pid} still running {seconds} s later (hung)")
    return code, time.time() - start


def _cleanup(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.distributed
def test_kill9_of_a_rank_fails_the_other_naming_it(tmp_path):
    procs, logs = _launch(tmp_path, 2)
    try:
        _wait_for_step(procs, logs[0], 2)
        os.kill(procs[1].pid, signal.SIGKILL)
        code, seconds = _exit_within(procs[0], 60)
    finally:
        _cleanup(procs)
    text = logs[0].read_text()
    assert code != 0
    assert re.search(r"megafusion train: rank 0 of 2: rank 1 of 2 is gone \(no heartbeat: killed or frozen\) "
                     r"after step \d+; exiting \(gloo: [^)]*(closed|reset) by peer", text), text[-3000:]
    assert "Traceback" not in text  # a one-line report (megafusion/errors.py), not a stack


@pytest.mark.distributed
def test_kill9_of_a_rank_under_torchrun_is_reported_not_silenced(tmp_path):
    """torchrun SIGTERMs the surviving ranks within a second of a death: the survivor still names the lost rank."""
    import psutil

    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megafusion.cli", "train", "--config", "tiny", *ARGS, f"training.run_dir={tmp_path}/run"]
    with open(log, "w") as f:
        agent = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for_step([agent], log, 2)
        ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(agent.pid).children(recursive=True)}
        ranks[1].kill()
        code, _ = _exit_within(agent, 60)
    finally:
        _cleanup([agent])
    text = log.read_text()
    assert code != 0
    assert re.search(r"megafusion train: rank 0 of 2: rank 1 of 2 is gone \(no heartbeat: killed or frozen\) after "
                     r"step \d+", text), text[-3000:]
    assert re.search(r"exitcode\s*: 1 \(pid", text), text[-3000:]  # rank 0 exited with its error, not SIGTERM


@pytest.mark.distributed
def test_a_frozen_peer_fails_the_other_after_parallel_timeout(tmp_path):
    procs, logs = _launch(tmp_path, 2, ["parallel.timeout_minutes=0.2"])  # 12 s
    try:
        _wait_for_step(procs, logs[0], 2)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive but silent: only the timeout can end rank 0's wait
        code, seconds = _exit_within(procs[0], 60)
    finally:
        _cleanup(procs)
    text = logs[0].read_text()
    assert code != 0 and seconds >= 10, (code, seconds, text[-3000:])
    assert re.search(r"rank 0 of 2: rank 1 of 2 is gone \(no heartbeat: killed or frozen\) after step \d+; "
                     r"exiting \(gloo: Timed out waiting 12000ms", text), text[-3000:]


@pytest.mark.distributed
def test_sigterm_while_blocked_on_a_frozen_peer_exits(tmp_path):
    procs, logs = _launch(tmp_path, 2)  # default parallel.timeout_minutes (5): the watchdog must not wait for it
    try:
        _wait_for_step(procs, logs[0], 2)
        os.kill(procs[1].pid, signal.SIGSTOP)  # rank 0 soon blocks in the next collective
        time.sleep(1.0)
        os.kill(procs[0].pid, signal.SIGTERM)
        code, seconds = _exit_within(procs[0], 45)
    finally:
        _cleanup(procs)
    text = logs[0].read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert re.search(r"rank 0 of 2: received SIGTERM but the current step cannot complete: rank 1 of 2 is gone "
                     r"\(no heartbeat: killed or frozen\)\. No consistent checkpoint can be saved without every "
                     r"rank; exiting after step \d+ with status 143", text), text[-3000:]


@pytest.mark.distributed
def test_ctrl_c_once_saves_and_exits_twice_aborts(tmp_path):
    ckpt = tmp_path / "ckpt"
    procs, logs = _launch(tmp_path, 1, [f"checkpoint.save_dir={ckpt}"])
    try:
        _wait_for_step(procs, logs[0], 2)
        os.kill(procs[0].pid, signal.SIGINT)
        code, _ = _exit_within(procs[0], 60)
    finally:
        _cleanup(procs)
    text = logs[0].read_text()
    assert code == 0, text[-3000:]
    assert "received SIGINT: will save a checkpoint" in text
    saved = int(re.search(r"iter_(\d+)", (ckpt / "latest").read_text()).group(1))
    assert saved >= 2

    procs, logs = _launch(tmp_path, 1, [f"checkpoint.save_dir={tmp_path}/ckpt2",
                                        f"training.run_dir={tmp_path}/run2"])
    try:
        _wait_for_step(procs, logs[0], 2)
        os.kill(procs[0].pid, signal.SIGINT)
        time.sleep(0.2)  # two signals sent at once may merge into one
        os.kill(procs[0].pid, signal.SIGINT)
        code, _ = _exit_within(procs[0], 30)
    finally:
        _cleanup(procs)
    text = logs[0].read_text()
    assert code == 128 + signal.SIGINT, text[-3000:]
    assert re.search(r"second interrupt \(Ctrl-C\): aborting without saving after step \d+", text), text[-3000:]
