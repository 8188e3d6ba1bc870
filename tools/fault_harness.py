"""The bookkeeping of tools/fault_battery.py: tagged processes, exit status, seconds to exit, files on disk,
processes left behind, the table and the summary line. The faults themselves are in tools/fault_cases.py.

A fault is a function `case(run) -> Seen` registered in fault_cases.SCENARIOS with the outcome it expects. `run`
(Run) starts tagged processes in the fault's own folder; afterwards the battery looks for live processes that
carry its tag (children of a killed trainer, orphaned ranks), counts them and kills them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "MEGAFUSION_FAULT_TAG"
TINY = ["--config", "tiny", "data.num_workers=0", "logging.tensorboard=false", "logging.log_interval=1",
        "optimizer.warmup_steps=0", "training.global_batch_size=4", "training.micro_batch_size=2"]
PATIENCE = 120.0  # seconds a run may take before the battery calls it hung


@dataclass
class Seen:
    handled: bool
    observed: str
    lost: str = "none"
    hung: bool = False
    exit_seconds: Optional[float] = None


@dataclass
class Row:
    name: str
    expected: str
    seen: Seen
    left: int
    seconds: float


class Run:
    """One scenario's folder and processes."""

    def __init__(self, folder: str, tag: str, shared: "Shared"):
        self.folder, self.tag, self.shared = folder, tag, shared
        os.makedirs(folder, exist_ok=True)
        self._logs = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def start(self, args: List[str], env: Optional[dict] = None, module: bool = True) -> subprocess.Popen:
        """Start `python -m megafusion.cli ARGS` (or `python ARGS` with module=False), tagged, logging to a file."""
        self._logs += 1
        log = open(self.path(f"log{self._logs}.txt"), "w")
        cmd = [sys.executable, "-m", "megafusion.cli", *args] if module else [sys.executable, *args]
        full_env = {**os.environ, TAG: self.tag, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name  # type: ignore[attr-defined]
        return proc

    def train(self, run_dir: str, *overrides: str, nan_steps: str = "", env: Optional[dict] = None,
              base: Optional[List[str]] = None) -> subprocess.Popen:
        args = ["train", *(TINY if base is None else base), f"training.run_dir={run_dir}", *overrides]
        if nan_steps:
            return self.start(["tools/fault_battery.py", "inject", "--nan-steps", nan_steps, "--", *args], env,
                              module=False)
        return self.start(args, env)

    def srun(self, n: int, run_dir: str, *overrides: str) -> List[subprocess.Popen]:
        """n ranks started the way srun does: each its own process with RANK/WORLD_SIZE/MASTER_* set."""
        port = str(_free_port())
        return [self.train(run_dir, *overrides, env={"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                for r in range(n)]

    @staticmethod
    def wait(proc: subprocess.Popen, timeout: float = PATIENCE) -> Tuple[Optional[int], float]:
        """(exit status or None when it did not exit in `timeout`, seconds waited)."""
        t0 = time.monotonic()
        try:
            return proc.wait(timeout=timeout), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - t0

    def finish(self, proc: subprocess.Popen, timeout: float = PATIENCE) -> Tuple[Optional[int], str]:
        rc, _ = self.wait(proc, timeout)
        return rc, self.log(proc)

    @staticmethod
    def log(proc: subprocess.Popen) -> str:
        with open(proc.log_path) as f:  # type: ignore[attr-defined]
            return f.read()

    @staticmethod
    def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = PATIENCE) -> bool:
        """Poll <run_dir>/metrics.jsonl until it logs `step` (False if the process died or time ran out)."""
        path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isfile(path):
                with open(path) as f:
                    if sum(1 for _ in f) >= step:
                        return True
            time.sleep(0.05)
        return False

    def leftovers(self, grace: float = 5.0) -> List[psutil.Process]:
        """Live processes carrying this scenario's tag after `grace` seconds; they are killed before returning."""
        deadline = time.monotonic() + grace
        while True:
            alive = [p for p in _tagged(self.tag) if p.status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        return alive


def _tagged(tag: str) -> List[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TAG) == tag:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def published(save_dir: str) -> List[str]:
    """Complete checkpoints in `save_dir`, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    from megafusion.checkpoint.publish import is_complete

    return sorted(n for n in os.listdir(save_dir) if n.startswith("iter_") and is_complete(os.path.join(save_dir, n)))


class Shared:
    """Things several scenarios need, built once: a preprocessed dataset made with the real tools."""

    def __init__(self, folder: str):
        self.folder = folder
        self._dataset: Optional[str] = None

    def dataset(self, run: Run) -> str:
        if self._dataset is None:
            out = os.path.join(self.folder, "dataset")
            corpus, tok = os.path.join(out, "corpus"), os.path.join(out, "tok")
            steps = [["-m", "megafusion.demo.stages", "corpus", "--out", corpus, "--scale", "0.02"]]
            for args in steps:
                proc = run.start(args, module=False)
                if run.wait(proc)[0] != 0:
                    raise RuntimeError(f"building the battery's corpus failed: {last_line(run.log(proc))}")
            parquet = sorted(os.path.join(corpus, "train", f) for f in os.listdir(os.path.join(corpus, "train")))
            for args in (["tools/train_tokenizer.py", "--input", *parquet, "--model-prefix", tok,
                          "--vocab-size", "512"],
                         ["tools/preprocess_data.py", "--input", *parquet, "--output", os.path.join(out, "data"),
                          "--tokenizer", tok + ".model", "--encoder", "pixel", "--resolution", "32",
                          "--patch-size", "4", "--seq-length", "384", "--no-progress"]):
                proc = run.start(args, module=False)
                if run.wait(proc)[0] != 0:
                    raise RuntimeError(f"{args[0]} failed: {last_line(run.log(proc))}")
            self._dataset = os.path.join(out, "data")
        return self._dataset


# "--config demo" shrunk to a fast model, on the shared dataset (3x32x32 pixel latents, 4x4 patches)
def demo_base(data: str) -> List[str]:
    return ["--config", "demo", f"data.paths=[{data}]", "model.num_layers=1", "model.hidden_size=64",
            "model.ffn_hidden_size=128", "training.global_batch_size=2", "training.micro_batch_size=2",
            "optimizer.warmup_steps=0", "logging.log_interval=1"]


class Battery:
    def __init__(self, scratch: str):
        self.scratch, self.rows = scratch, []
        self.shared = Shared(os.path.join(scratch, "shared"))

    def run(self, name: str, expected: str, scenario: Callable[[Run], Seen]) -> None:
        run = Run(os.path.join(self.scratch, name), f"{os.getpid()}-{name}", self.shared)
        print(f"[faults] {name}: {expected}", flush=True)
        t0 = time.monotonic()
        try:
            seen = scenario(run)
        except Exception as e:  # noqa: BLE001 - the battery reports, it does not stop
            seen = Seen(False, f"battery error: {type(e).__name__}: {e}")
        left = run.leftovers()
        seen.observed = seen.observed.replace(self.scratch + os.sep, "")  # paths relative to the scratch folder
        row = Row(name, expected, seen, len(left), time.monotonic() - t0)
        self.rows.append(row)
        state = "handled" if self.handled(row) else "NOT HANDLED"
        print(f"[faults] {name}: {state}: {seen.observed}" + (f"; {len(left)} process(es) left" if left else ""),
              flush=True)

    @staticmethod
    def handled(row: Row) -> bool:
        return row.seen.handled and row.left == 0 and row.seen.lost == "none" and not row.seen.hung

    def all_handled(self) -> bool:
        return all(self.handled(r) for r in self.rows)

    def cleanup(self) -> None:
        for p in psutil.process_iter():
            try:
                if str(p.environ().get(TAG, "")).startswith(f"{os.getpid()}-"):
                    p.kill()
            except psutil.Error:
                pass

    def table(self) -> str:
        head = ("fault", "expected", "observed", "lost", "left", "exit s")
        rows = [(r.name, r.expected, r.seen.observed, r.seen.lost, str(r.left),
                 f"{r.seen.exit_seconds:.1f}" if r.seen.exit_seconds is not None else "-") for r in self.rows]
        widths = [min((28, 44, 100)[i] if i < 3 else 99, max(len(x[i]) for x in [head] + rows))
                  for i in range(len(head))]

        def fmt(cells):
            return " | ".join(c[:w].ljust(w) if i < 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows])

    def summary(self) -> str:
        n = len(self.rows)
        handled = sum(self.handled(r) for r in self.rows)
        lost = sum(r.seen.lost != "none" for r in self.rows)
        hung = sum(r.seen.hung for r in self.rows)
        left = sum(r.left for r in self.rows)
        return f"faults: {n} injected, {handled} handled, {lost} lost, {hung} hung, {left} processes left"

