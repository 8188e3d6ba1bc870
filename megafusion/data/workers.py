"""Background processes that build micro-batches into a shared-memory ring (data.num_workers > 0).

Worker w of W builds micro-steps w, w + W, w + 2W, ... of an iterator on its own: it plans them with its copy of
the source (a plan is a pure function of the sample index, so every copy plans the same rows), reads, patchifies
and collates them straight into a slot of the ring (`BatchRing`), and sends only the slot's field table through
its pipe. The caller takes the batches from the workers' pipes in turn, which is the micro-step order, as views
of their slots (`lease`); a slot is written again once the caller has dropped every tensor of its batch. Per batch
the training process thus unpickles a small table and wraps a few views, nothing else.

Lifetime: a worker never outlives its caller. It dies with it (PR_SET_PDEATHSIG, utils/processes.py), and also
returns when a poll of its parent pid (every POLL_S while it waits for credits) finds it re-parented, or when the
caller's end of its pipe is gone. Stop signals (SIGINT, SIGTERM, SIGUSR1) are the caller's to act on: a worker
ignores them, so a graceful stop can still take the batches of its last step; `close()` kills the workers.

Flow control: a worker builds at most PREFETCH batches ahead of the caller (a semaphore the caller releases as it
takes one) and owns PREFETCH + HELD / W slots; while the caller holds more of its batches than that, its next
batch travels through the pipe by value instead. In every Batch handed out, noisy_latents is latents (collate.py).
"""

from __future__ import annotations

import multiprocessing
import os
import weakref

import torch
from torch._utils import ExceptionWrapper

from megafusion.data.batch import Batch
from megafusion.data.batch_ring import BatchRing
from megafusion.data.collate import batch_from_fields
from megafusion.data.sampler import MicroBatchSampler
from megafusion.utils.processes import become_helper, parent_alive

PREFETCH = 4  # batches a worker builds ahead of the caller
HELD = 12  # batches the caller may hold (all workers together) before batches travel by value
POLL_S = 1.0  # how often a waiting worker checks that its caller is still alive (where PDEATHSIG is missing)


class WorkerPool:
    """`num_workers` processes building the micro-steps of `sampler` (from its consumed_samples on) with
    `dataset.fields`; iterating yields their batches in micro-step order."""

    def __init__(self, dataset, source, sampler: MicroBatchSampler, num_workers: int, micro_batch_size: int):
        per_worker = PREFETCH + -(-HELD // num_workers)
        self.ring = BatchRing(per_worker * num_workers, dataset.field_bytes(micro_batch_size))
        ctx = multiprocessing.get_context()
        self._credits, self._conns, self._procs = [], [], []
        for w in range(num_workers):
            credits = ctx.Semaphore(PREFETCH)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_work, daemon=True,
                               args=(w, num_workers, dataset, source, sampler, self.ring, w * per_worker,
                                     per_worker, credits, send, os.getpid()))
            proc.start()
            send.close()  # the worker holds the only write end: its exit ends the pipe
            self._credits.append(credits)
            self._conns.append(recv)
            self._procs.append(proc)
        self._next = 0
        self.close = weakref.finalize(self, _stop, self._procs)

    def __iter__(self) -> "WorkerPool":
        return self

    def __next__(self) -> Batch:
        w = self._next % len(self._procs)
        try:
            msg = self._conns[w].recv()
        except EOFError:
            self._procs[w].join(5)
            raise RuntimeError(f"data loader worker {w} (pid {self._procs[w].pid}) exited unexpectedly with exit "
                               f"code {self._procs[w].exitcode}") from None
        self._credits[w].release()
        self._next += 1
        if isinstance(msg, ExceptionWrapper):
            msg.reraise()
        slot, payload = msg
        return self.ring.lease(slot, payload) if slot >= 0 else batch_from_fields(payload)


def _work(w: int, num_workers: int, dataset, source, sampler: MicroBatchSampler, ring: BatchRing, first_slot: int,
          slots: int, credits, conn, parent_pid: int) -> None:
    become_helper(parent_pid)
    torch.set_num_threads(1)
    step = sampler.consumed_samples // sampler.samples_per_micro_step + w
    try:
        while True:
            while not credits.acquire(timeout=POLL_S):
                if not parent_alive(parent_pid):
                    return  # orphaned (no PDEATHSIG here): nobody will take this batch
            plans = [source.plan(i) for i in sampler.indices(step)]
            slot = ring.take(first_slot, slots)
            if slot < 0:
                conn.send((slot, dataset.fields(plans)))
            else:
                writer = ring.writer(slot)
                dataset.fields(plans, writer)
                conn.send((slot, writer.table))
            step += num_workers
    except (BrokenPipeError, ConnectionResetError):  # the caller closed its end: it is done or gone
        pass
    except Exception:
        try:
            conn.send(ExceptionWrapper(where=f"in data loader worker {w}"))
        except (BrokenPipeError, ConnectionResetError):
            pass


def _stop(procs) -> None:
    for proc in procs:  # SIGKILL: workers ignore the stop signals and hold nothing worth flushing
        proc.kill()
    for proc in procs:
        proc.join(timeout=10)

