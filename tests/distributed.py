"""Run a test function on N gloo processes (CPU): the harness of every distributed test.

    def _worker(rank, world_size, out_dir): ...        # top-level, so spawned processes can import it
    run_distributed(_worker, world_size=2, args=(str(tmp_path),))

Each process gets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, joins a gloo process group and is torn down
after the function returns; a failure on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import contextlib
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, args=()) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            failures.append((-1, f"process {p.pid} timed out"))
        elif p.exitcode != 0 and not failures:
            failures.append((-1, f"process exited with code {p.exitcode}"))
    if failures:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures))


@contextlib.contextmanager
def megatron_single_process():
    """A 1-process gloo group (unless one exists) with megatron parallel_state at TP=PP=1, torn down after.
    model_parallel_cuda_manual_seed needs CUDA, so callers seed weights with torch.manual_seed."""
    from megatron.core import parallel_state

    created = False
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        created = True
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def megatron_cpu_single_process():
    """megatron_single_process with cpu_compat forced: megatron's MoE router moves its weight to
    torch.cuda.current_device(), so MoE layers on CPU tensors need it (forced so they stay on the CPU on a GPU
    machine too)."""
    from megafusion.parallel.cpu_compat import disable_cpu_compat, enable_cpu_compat

    active = enable_cpu_compat(force=True)
    try:
        with megatron_single_process():
            yield
    finally:
        if active:
            disable_cpu_compat()
