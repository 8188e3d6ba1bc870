"""Training metrics: throughput, MFU, and the sinks (a human line, <run_dir>/metrics.jsonl, TensorBoard, and
Weights & Biases when logging.wandb_project is set: training/wandb_sink.py, the same scalars at the same steps).

Only rank 0 writes. MFU = achieved model FLOP/s per device / peak FLOP/s per device, where the peak is
logging.peak_flops if set, else H100 bf16 dense (989 TFLOP/s) on GPU, else a GEMM measured once at start-up on
CPU (so CPU MFU says how close the step comes to this machine's own matmul speed).

Each step appears once, across restarts: a run that resumes from step S (a fresh run: S = 0) first drops the
lines of metrics.jsonl with step > S (steps the previous run logged after its last checkpoint, which this run is
about to redo; the file is rewritten atomically, and a line cut short by a crash goes with them), and opens
TensorBoard with purge_step=S+1, so TensorBoard hides the older events from step S+1 on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional

import torch

from megafusion.utils.files import write_atomic

H100_BF16_DENSE_FLOPS = 989e12


def measure_gemm_peak(n: int = 1024, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """FLOP/s of an n x n x n matmul on this device (the best of `reps`): the CPU stand-in for a datasheet peak."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm up
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def resolve_peak_flops(configured: Optional[float]) -> float:
    if configured:
        return float(configured)
    if torch.cuda.is_available():
        return H100_BF16_DENSE_FLOPS
    return measure_gemm_peak()


def drop_steps_after(path: str, step: int) -> int:
    """Rewrite the JSON-lines file `path` (atomically) without the records whose "step" is > `step`, and without
    lines that do not parse (a record cut short by a crash); returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= step
            except (ValueError, TypeError, AttributeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped


class MetricsWriter:
    """Rank 0's metrics.jsonl, TensorBoard and W&B writer; `resume_step` is the step the run starts from.
    `config`: the run's Config, for W&B (its logging.wandb_project turns W&B on; the whole tree is the W&B run's
    config); None: no W&B."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int = 0, config=None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        self.dropped = 0
        """Lines of an earlier run's metrics.jsonl dropped because this run redoes (or replaces) their steps."""
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.dropped = drop_steps_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1)
            except ImportError as e:  # tensorboard is a declared dependency; say so if it is missing
                raise ImportError("logging.tensorboard=true needs `pip install tensorboard` (or set it false)") from e
        if config is not None and config.logging.wandb_project:
            from megafusion.training.wandb_sink import WandbSink

            self._wandb = WandbSink.open(config, run_dir)

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, record)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close(exit_code=1 if sys.exc_info()[1] is not None else 0)  # closed while an error unwinds
            self._wandb = None


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_line(step: int, total: int, values: Dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key in ("loss", "loss_ce", "loss_fm", "weight_ce", "weight_fm", "loss_text", "loss_image", "loss_audio",
                "moe_aux_loss", "grad_norm", "lr",
                "tokens_per_s", "mfu"):
        if key in values and values[key] is not None:
            v = _plain(values[key])
            parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    if values.get("skipped_steps"):
        parts.append(f"skipped {values['skipped_steps']}")
    return " | ".join(parts)
