"""Training metrics: throughput, MFU, and the three sinks (a human line, <run_dir>/metrics.jsonl, TensorBoard).

Only rank 0 writes. MFU = achieved model FLOP/s per device / peak FLOP/s per device, where the peak is
logging.peak_flops if set, else H100 bf16 dense (989 TFLOP/s) on GPU, else a GEMM measured once at start-up on
CPU (so CPU MFU says how close the step comes to this machine's own matmul speed).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional

import torch

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


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError as e:  # tensorboard is a declared dependency; say so if it is missing
                raise ImportError("logging.tensorboard=true needs `pip install tensorboard` (or set it false)") from e

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_line(step: int, total: int, values: Dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key in ("loss", "loss_ce", "loss_fm", "weight_ce", "weight_fm", "moe_aux_loss", "grad_norm", "lr",
                "tokens_per_s", "mfu"):
        if key in values and values[key] is not None:
            v = _plain(values[key])
            parts.append(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}")
    if values.get("skipped_steps"):
        parts.append(f"skipped {values['skipped_steps']}")
    return " | ".join(parts)
