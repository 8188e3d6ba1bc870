"""Run a few `megafusion train` steps in this process and print, as one JSON line, the resident memory the run
added: {"baseline": RSS after every import (bytes), "peak": the high-water mark during train() (bytes)}.

    MALLOC_MMAP_THRESHOLD_=131072 python tests/planning/measure_cpu_run.py RUN_DIR key=value ...

Before the baseline the intra-op thread pool and the GEMM / attention kernels' workspaces are warmed up (they
belong to the process, not to the run). The caller fixes glibc's mmap threshold (its dynamic threshold would keep freed tensors in the heap, so the
high-water mark would count allocator reuse patterns instead of live tensors). The high-water mark is reset to
the current RSS (Linux /proc/self/clear_refs, value 5) right before train(), so what the imports touched is not in
it; peak - baseline is what training itself needed: model, DDP buffers, optimizer, activations, transients, plus
the process group, data, megatron's Python objects and the allocator's own overhead.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _warm_up(torch) -> None:
    """Start the intra-op thread pool and the GEMM / attention kernels' per-thread workspaces before the baseline:
    they are the process's, not the run's."""
    x = torch.randn(256, 256, requires_grad=True)
    q = torch.randn(1, 2, 64, 32, requires_grad=True)
    y = (x @ x).sum() + torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
    y.backward()


def main() -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(2)
    from megafusion.config import load_config
    from megafusion.training.loop import train  # every import the run needs happens here, before the baseline

    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("tiny", [f"training.run_dir={run_dir}", *overrides])
    logging.disable(logging.INFO)
    _warm_up(torch)
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    records = train(cfg)
    print(json.dumps({"baseline": baseline, "peak": _status("VmHWM"), "steps": len(records)}))


if __name__ == "__main__":
    main()
