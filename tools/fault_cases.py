"""The faults of tools/fault_battery.py, each injected for real into `megafusion` runs, and what must follow.

SCENARIOS maps a fault's name to (expected outcome, case). A case starts runs through fault_harness.Run, injects
the fault from outside (a signal, kill -9, a truncated file, a folder in the way, a full tmpfs) and returns Seen:
whether the outcome was the expected one, what was observed, whether data was lost, the seconds the run took to
exit after the fault. Processes left alive are counted by the battery itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, Dict, Tuple

from fault_harness import PATIENCE, Run, Seen, demo_base, last_line, published

SCENARIOS: Dict[str, Tuple[str, Callable[[Run], Seen]]] = {}


def fault(name: str, expected: str):
    def register(fn):
        SCENARIOS[name] = (expected, fn)
        return fn
    return register


def _hung(what: str) -> Seen:
    return Seen(False, f"{what} did not exit within {PATIENCE:.0f} s", hung=True)


def _long(run: Run, run_dir: str, *overrides: str, **kw) -> subprocess.Popen:
    """A run that trains until stopped (tiny model, a checkpoint every step)."""
    return run.train(run_dir, "training.train_steps=100000", "checkpoint.save_interval=1", *overrides, **kw)


# ------------------------------------------------------------------------------------------------ signals
@fault("sigterm", "exit 0 at the next step, its checkpoint published")
def sigterm(run: Run) -> Seen:
    run_dir = run.path("run")
    proc = _long(run, run_dir, "checkpoint.save_interval=0")
    if not run.wait_for_step(run_dir, 3, proc):
        return Seen(False, f"the run never reached step 3: {last_line(run.log(proc))}")
    proc.send_signal(signal.SIGTERM)
    rc, seconds = run.wait(proc)
    if rc is None:
        return _hung("the run")
    ckpts = published(os.path.join(run_dir, "checkpoints"))
    ok = rc == 0 and bool(ckpts)
    return Seen(ok, f"exit {rc}, published {ckpts[-1] if ckpts else 'nothing'}",
                lost="none" if ckpts else "the run's steps", exit_seconds=seconds)


@fault("ctrl-c", "first Ctrl-C: save and exit 0; a second: abort (130)")
def ctrl_c(run: Run) -> Seen:
    results = []
    for presses in (1, 2):
        run_dir = run.path(f"run{presses}")
        proc = _long(run, run_dir, "checkpoint.save_interval=0")
        if not run.wait_for_step(run_dir, 2, proc):
            return Seen(False, f"the run never reached step 2: {last_line(run.log(proc))}")
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        rc, seconds = run.wait(proc)
        if rc is None:
            return _hung(f"the run after {presses} Ctrl-C")
        results.append((rc, bool(published(os.path.join(run_dir, "checkpoints"))), seconds))
    (rc1, saved1, s1), (rc2, _, s2) = results
    ok = rc1 == 0 and saved1 and rc2 not in (0, None)
    return Seen(ok, f"once: exit {rc1}, {'saved' if saved1 else 'nothing saved'}; twice: exit {rc2}",
                lost="none" if saved1 else "the run's steps", exit_seconds=max(s1, s2))


@fault("kill-9-during-save", "`latest` stays the previous complete checkpoint; resume continues from it")
def kill_during_save(run: Run) -> Seen:
    run_dir = run.path("run")
    ckpt = os.path.join(run_dir, "checkpoints")
    proc = _long(run, run_dir)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt) and any(n.startswith("tmp.iter_0000003") for n in os.listdir(ckpt)):
            break
        time.sleep(0.002)
    else:
        return Seen(False, f"the run never staged checkpoint 3: {last_line(run.log(proc))}")
    proc.kill()
    proc.wait()
    latest = published(ckpt)
    resumed = run.train(run_dir, "training.train_steps=4")
    rc, log = run.finish(resumed)
    ok = rc == 0 and latest[-1:] == ["iter_0000002"] and "resumed from" in log
    return Seen(ok, f"latest {latest[-1] if latest else 'none'}; resumed run exit {rc}",
                lost="none" if ok else "checkpoint")


# ------------------------------------------------------------------------------------------------ NaN
@fault("nan-on-save-step", "nan_policy=skip: the last good state is still saved at the due step")
def nan_on_save_step(run: Run) -> Seen:
    run_dir = run.path("run")
    proc = run.train(run_dir, "training.train_steps=4", "checkpoint.save_interval=2", "training.nan_policy=skip",
                     nan_steps="2,4")
    rc, log = run.finish(proc)
    if rc is None:
        return _hung("the run")
    ckpts = published(os.path.join(run_dir, "checkpoints"))
    claimed = [line for line in log.splitlines() if "saved checkpoint" in line]
    false_claims = [c for c in claimed if not any(c.rstrip().endswith(n) or f"/{n} " in c for n in ckpts)]
    ok = (rc == 0 and "iter_0000004" in ckpts and not false_claims) or (rc != 0 and "saved" not in log)
    return Seen(ok, f"exit {rc}, published {ckpts}, {len(false_claims)} false save claims",
                lost="none" if "iter_0000004" in ckpts else "the final state")


# ------------------------------------------------------------------------------------------------ peers
@fault("dead-peer", "rank 0 exits non-zero within parallel.timeout_minutes, naming rank 1 and the last step")
def dead_peer(run: Run) -> Seen:
    run_dir = run.path("run")
    ranks = run.srun(2, run_dir, "training.train_steps=100000", "parallel.timeout_minutes=0.5")
    if not run.wait_for_step(run_dir, 3, ranks[0]):
        return Seen(False, f"the job never reached step 3: {last_line(run.log(ranks[0]))}")
    ranks[1].kill()
    rc, seconds = run.wait(ranks[0], timeout=90)
    if rc is None:
        return _hung("rank 0")
    line = last_line(run.log(ranks[0]))
    ok = rc != 0 and "rank 1" in line and "step" in line
    return Seen(ok, f"exit {rc} after {seconds:.0f} s: {line}", exit_seconds=seconds)


@fault("sigterm-in-collective", "a rank blocked on a frozen peer still stops on SIGTERM")
def sigterm_in_collective(run: Run) -> Seen:
    run_dir = run.path("run")
    ranks = run.srun(2, run_dir, "training.train_steps=100000", "parallel.timeout_minutes=10")
    if not run.wait_for_step(run_dir, 3, ranks[0]):
        return Seen(False, f"the job never reached step 3: {last_line(run.log(ranks[0]))}")
    ranks[1].send_signal(signal.SIGSTOP)
    time.sleep(2.0)  # rank 0 is now waiting for rank 1 in a collective
    ranks[0].send_signal(signal.SIGTERM)
    rc, seconds = run.wait(ranks[0], timeout=90)
    ranks[1].send_signal(signal.SIGCONT)
    run.wait(ranks[1], timeout=60)
    if rc is None:
        return _hung("rank 0")
    line = last_line(run.log(ranks[0]))
    return Seen(rc is not None, f"exit {rc} after {seconds:.0f} s: {line}", exit_seconds=seconds)


# ------------------------------------------------------------------------------------------------ run folder
@fault("second-run-same-folder", "refused at start-up, naming the live holder (pid, host, start time)")
def second_run(run: Run) -> Seen:
    run_dir = run.path("run")
    first = _long(run, run_dir, "checkpoint.save_interval=0")
    if not run.wait_for_step(run_dir, 1, first):
        return Seen(False, f"the first run never started: {last_line(run.log(first))}")
    t0 = time.monotonic()
    rc, log = run.finish(run.train(run_dir, "training.train_steps=2"))
    seconds = time.monotonic() - t0
    first.send_signal(signal.SIGTERM)
    run.wait(first)
    line = last_line(log)
    ok = rc not in (0, None) and str(first.pid) in line
    return Seen(ok, f"exit {rc}: {line}", exit_seconds=seconds)


@fault("restart-after-kill-9", "a crashed run's lock does not block the restart, which resumes")
def stale_lock(run: Run) -> Seen:
    run_dir = run.path("run")
    proc = _long(run, run_dir)
    if not run.wait_for_step(run_dir, 3, proc):
        return Seen(False, f"the run never reached step 3: {last_line(run.log(proc))}")
    proc.kill()
    proc.wait()
    rc, log = run.finish(run.train(run_dir, "training.train_steps=5"))
    ok = rc == 0 and "resumed from" in log
    return Seen(ok, f"restart exit {rc}: {'resumed' if 'resumed from' in log else last_line(log)}")


@fault("fresh-run-over-checkpoints", "checkpoint.load=none into a folder with checkpoints is refused")
def fresh_over_checkpoints(run: Run) -> Seen:
    run_dir = run.path("run")
    rc, log = run.finish(run.train(run_dir, "training.train_steps=2"))
    if rc != 0:
        return Seen(False, f"the first run failed: {last_line(log)}")
    before = published(os.path.join(run_dir, "checkpoints"))
    rc, log = run.finish(run.train(run_dir, "training.train_steps=2", "checkpoint.load=none"))
    after = published(os.path.join(run_dir, "checkpoints"))
    line = last_line(log)
    ok = rc not in (0, None) and "overwrite" in line and before == after
    return Seen(ok, f"exit {rc}: {line}", lost="none" if before == after else "checkpoints")


@fault("truncated-checkpoint", "named before loading, with the previous complete checkpoint to load instead")
def truncated_checkpoint(run: Run) -> Seen:
    run_dir = run.path("run")
    rc, log = run.finish(run.train(run_dir, "training.train_steps=4", "checkpoint.save_interval=2"))
    ckpt = os.path.join(run_dir, "checkpoints")
    if rc != 0 or published(ckpt)[-1:] != ["iter_0000004"]:
        return Seen(False, f"the first run failed: {last_line(log)}")
    victim = max((os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(ckpt, "iter_0000004")) for f in fs
                  if f.endswith(".distcp")), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    rc, log = run.finish(run.train(run_dir, "training.train_steps=6"))
    line = last_line(log)
    ok = rc not in (0, None) and os.path.basename(victim) in line and "iter_0000002" in line
    return Seen(ok, f"exit {rc}: {line}")


# ------------------------------------------------------------------------------------------------ processes
@fault("kill-9-with-loader-workers", "the trainer's loader workers exit with it")
def orphans(run: Run) -> Seen:
    data = run.shared.dataset(run)
    run_dir = run.path("run")
    proc = run.train(run_dir, "training.train_steps=100000", "data.num_workers=2", base=demo_base(data))
    if not run.wait_for_step(run_dir, 2, proc):
        return Seen(False, f"the run never reached step 2: {last_line(run.log(proc))}")
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    return Seen(not alive, f"{len(children)} children; {len(gone)} gone within 10 s, {len(alive)} alive")


# ------------------------------------------------------------------------------------------------ bad input
def _refused(run: Run, needle: str, *overrides: str, base=None) -> Seen:
    t0 = time.monotonic()
    rc, log = run.finish(run.train(run.path("run"), "training.train_steps=2", *overrides, base=base))
    line = last_line(log)
    ok = rc not in (0, None) and needle in line and "Traceback" not in log
    return Seen(ok, f"exit {rc}: {line}", exit_seconds=time.monotonic() - t0)


@fault("vocab-below-tokenizer", "one line naming model.vocab_size, the dataset and the value to set")
def vocab(run: Run) -> Seen:
    return _refused(run, "set model.vocab_size=512", "model.vocab_size=256", base=demo_base(run.shared.dataset(run)))


@fault("truncated-dataset-file", "one line naming the truncated file")
def truncated_dataset(run: Run) -> Seen:
    data = run.path("data")
    shutil.copytree(run.shared.dataset(run), data)
    with open(os.path.join(data, "latents.bin"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(data, "latents.bin")) - 4096)
    return _refused(run, "latents.bin", base=demo_base(data))


@fault("yaml-not-a-mapping", "one line naming the file")
def yaml_list(run: Run) -> Seen:
    path = run.path("list.yaml")
    with open(path, "w") as f:
        f.write("- model\n- data\n")
    return _refused(run, f"{path}: the top level must be a mapping", base=["--config", path])


@fault("unwritable-run-dir", "one line naming training.run_dir and the reason")
def unwritable(run: Run) -> Seen:
    blocker = run.path("a-file")
    open(blocker, "w").close()
    rc, log = run.finish(run.train(os.path.join(blocker, "run"), "training.train_steps=2"))
    line = last_line(log)
    return Seen(rc not in (0, None) and "training.run_dir=" in line and "Traceback" not in log, f"exit {rc}: {line}")


@fault("full-disk", "one line naming the path; the previous checkpoint stays `latest`")
def full_disk(run: Run) -> Seen:
    mount = run.path("tmpfs")
    os.makedirs(mount)
    if subprocess.call(["mount", "-t", "tmpfs", "-o", "size=4500k", "tmpfs", mount],
                       stderr=subprocess.DEVNULL) != 0:
        return Seen(True, "skipped: mounting a tmpfs needs root")
    try:
        rc, log = run.finish(run.train(run.path("run"), "training.train_steps=6", "checkpoint.save_interval=1",
                                       f"checkpoint.save_dir={mount}/ckpt"))
        line, ckpts = last_line(log), published(os.path.join(mount, "ckpt"))
        latest_ok = bool(ckpts) and os.path.isfile(os.path.join(mount, "ckpt", "latest"))
        ok = rc not in (0, None) and mount in line and "Traceback" not in log and latest_ok
        return Seen(ok, f"exit {rc}: {line}; complete: {ckpts}", lost="none" if latest_ok else "every checkpoint")
    finally:
        subprocess.call(["umount", "-l", mount])


@fault("preprocess-no-records", "named error; no output folder left behind")
def preprocess_empty(run: Run) -> Seen:
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = run.path("empty.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    out = run.path("out")
    tok = os.path.join(os.path.dirname(run.shared.dataset(run)), "tok.model")
    proc = run.start(["tools/preprocess_data.py", "--input", empty, "--output", out, "--tokenizer", tok,
                      "--no-progress"], module=False)
    rc, log = run.finish(proc)
    line = last_line(log)
    return Seen(rc not in (0, None) and "no records" in line and not os.path.exists(out),
                f"exit {rc}: {line}; output folder {'left' if os.path.exists(out) else 'absent'}")


@fault("preprocess-rejects", "every reject reason recorded with its record; threshold enforced (pytest)")
def preprocess_rejects(run: Run) -> Seen:
    proc = run.start(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/preprocess/test_preprocess_rejects.py",
                      "tests/data/test_indexed.py"], module=False)
    rc, log = run.finish(proc, timeout=600)
    return Seen(rc == 0, f"pytest: {last_line(log)}")
