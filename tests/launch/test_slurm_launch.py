"""launch/pretrain_7b.sh end to end on CPU under a fake SLURM: SIGUSR1 to the batch shell reaches every rank, the
ranks save and exit, the job is requeued, and the next start resumes from that checkpoint.

The fakes are small scripts first on PATH: `srun` runs its command once per "node" on this machine (SLURM_NODEID,
SLURM_PROCID set) and forwards SIGUSR1 / SIGTERM to them as the real one does; `scontrol` expands a comma list for
`show hostnames` and records `requeue` calls. The launcher is the real script with MEGAFUSION_CONFIG=tiny replacing
its preset, two "nodes" on localhost (a real torchrun c10d rendezvous, gloo) and one process per node.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "pretrain_7b.sh"
TRAIN_STEPS = 40

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun: run the command once per node here; forward SIGUSR1/SIGTERM to every node's process
echo "$*" >> "$FAKE_SLURM_LOG/srun.args"
nodes=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes=*) nodes=${1#--nodes=}; shift ;;
        --*) shift ;;
        *) break ;;
    esac
done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
forward() {
    echo "srun got SIG$1" >> "$FAKE_SLURM_LOG/srun.signals"
    for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null; done
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
    while :; do
        wait "$p"; s=$?
        kill -0 "$p" 2>/dev/null || break
    done
    [ "$rc" != 0 ] || rc=$s
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# fake scontrol: `show hostnames a,b` and `requeue ID` (recorded)
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.args"
if [ "$1 $2" = "show hostnames" ]; then tr ',' '\n' <<< "$3"; exit 0; fi
if [ "$1" = requeue ]; then exit 0; fi
echo "fake scontrol: unsupported: $*" >&2; exit 1
"""


def _fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, bin_dir: Path, restart: int) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_SLURM_LOG=str(tmp_path),
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost,localhost", SLURM_RESTART_COUNT=str(restart),
        SLURM_CPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(tmp_path),
        DATA_PATHS="synthetic", RUN_DIR=str(tmp_path / "run"), MEGAFUSION_CONFIG="tiny", GPUS_PER_NODE="1",
        MASTER_PORT=str(free_port()), PYTHON=sys.executable,
        TORCHRUN=str(Path(sys.executable).with_name("torchrun")),
        TRAIN_OVERRIDES=(f"training.train_steps={TRAIN_STEPS} data.num_workers=0 logging.tensorboard=false "
                         "optimizer.warmup_steps=1 parallel.timeout_minutes=1"),
    )
    return env


def _metrics_steps(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=10)


def _launch(tmp_path, env, log_name):
    log = open(tmp_path / log_name, "w")
    proc = subprocess.Popen(["bash", str(LAUNCHER)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(tmp_path), start_new_session=True)
    return proc, log


def _wait(proc, timeout, log_path):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"the launcher did not finish within {timeout} s; its log:\n{log_path.read_text()[-4000:]}")


@pytest.mark.distributed  # two torchrun agents and two gloo ranks
def test_usr1_saves_requeues_and_the_next_start_resumes(tmp_path):
    bin_dir = _fake_slurm(tmp_path)
    run_dir = tmp_path / "run"

    # ---- first start: SIGUSR1 to the batch shell once training is under way
    proc, log = _launch(tmp_path, _env(tmp_path, bin_dir, restart=0), "job1.log")
    try:
        deadline = time.monotonic() + 120
        while max(_metrics_steps(run_dir), default=0) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_tree(proc)
                log_text = (tmp_path / "job1.log").read_text()[-4000:]
                pytest.fail(f"training did not reach step 3; launcher log:\n{log_text}")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGUSR1)
        rc = _wait(proc, 120, tmp_path / "job1.log")
    finally:
        log.close()
    text = (tmp_path / "job1.log").read_text()
    assert rc == 0, text[-4000:]
    assert "srun got SIGUSR1" in (tmp_path / "srun.signals").read_text()
    record = json.loads((run_dir / "last_exit.json").read_text())
    assert record["reason"] == "signal" and record["signal"] == "SIGUSR1" and record["saved"], record
    stopped = record["step"]
    assert 3 <= stopped < TRAIN_STEPS
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"iter_{stopped:07d}")
    requeues = [line for line in (tmp_path / "scontrol.args").read_text().splitlines() if line.startswith("requeue")]
    assert requeues == ["requeue 4242"]
    assert "requeueing job 4242" in text
    srun_line = (tmp_path / "srun.args").read_text().splitlines()[0]
    assert "--nnodes=2" in srun_line and "--rdzv-backend=c10d" in srun_line and "checkpoint.load=auto" in srun_line

    # ---- the requeued start: resumes from that checkpoint and finishes
    proc, log = _launch(tmp_path, _env(tmp_path, bin_dir, restart=1), "job2.log")
    try:
        rc = _wait(proc, 120, tmp_path / "job2.log")
    finally:
        log.close()
    text = (tmp_path / "job2.log").read_text()
    assert rc == 0, text[-4000:]
    assert f"at step {stopped} of {TRAIN_STEPS}" in text  # "resumed from ... at step N of T"
    record = json.loads((run_dir / "last_exit.json").read_text())
    assert record["reason"] == "finished" and record["start_step"] == stopped and record["step"] == TRAIN_STEPS
    steps = _metrics_steps(run_dir)
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps  # each step once: the second start continued the first
    requeues = [line for line in (tmp_path / "scontrol.args").read_text().splitlines() if line.startswith("requeue")]
    assert requeues == ["requeue 4242"]  # a finished run is not requeued


def test_missing_environment_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATHS", "RUN_DIR", "SLURM_JOB_NODELIST")}
    out = subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "DATA_PATHS is not set" in out.stderr
    env["DATA_PATHS"] = "synthetic"
    out = subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "RUN_DIR is not set" in out.stderr
    env["RUN_DIR"] = str(tmp_path / "run")
    env["PYTHON"] = sys.executable
    env["TORCHRUN"] = str(Path(sys.executable).with_name("torchrun"))
    out = subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


def test_dry_run_prints_node_commands_and_the_resolved_config(tmp_path):
    env = dict(os.environ, DATA_PATHS="/data/a,/data/b", RUN_DIR=str(tmp_path / "run"), MEGAFUSION_CONFIG="tiny",
               PYTHON=sys.executable, TORCHRUN="torchrun", TRAIN_OVERRIDES="training.train_steps=7")
    env.pop("SLURM_JOB_NODELIST", None)
    env.pop("SLURM_JOB_NUM_NODES", None)
    out = subprocess.run(["bash", str(LAUNCHER), "--dry-run", "model.num_layers=4"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    nodes = [line for line in out.stdout.splitlines() if line.startswith("# node ")]
    assert len(nodes) == 32  # the header's --nodes=32 outside an allocation
    assert "--rdzv-endpoint=node0:" in out.stdout and "--signals-to-handle=" in out.stdout
    lines = out.stdout.splitlines()
    node0 = shlex.split(lines[lines.index(nodes[0]) + 1])  # the exact command, shell-quoted
    assert node0[0] == "torchrun" and "--nnodes=32" in node0 and "--nproc-per-node=8" in node0
    assert node0[node0.index("-m"):node0.index("-m") + 5] == ["-m", "megafusion.cli", "train", "--config", "tiny"]
    assert "data.paths=[/data/a,/data/b]" in node0 and node0[-1] == "checkpoint.load=auto"
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in out.stdout
    config = out.stdout.split("# resolved config", 1)[1]
    assert "num_layers: 4" in config and "train_steps: 7" in config and "load: auto" in config
    assert f"run_dir: {tmp_path / 'run'}" in config
