"""Graceful stop on SIGTERM / SIGUSR1 (SLURM's pre-emption warning, `scancel --signal`), agreed by every rank.

A signal usually reaches some ranks only (one node, or one process), and at different moments. The handler just
records the request; the training loop asks `should_stop(group)` once per step, at the same place on every rank,
and the flag is all-reduced (MAX) over the group, so every rank sees the same answer at the same step. The loop
then saves a checkpoint and exits with status 0:

    stop = StopSignal.install()                 # once, before the loop (main thread)
    for step in ...:
        ... train step ...
        if stop.should_stop(group=None):        # collective on the world group
            save_checkpoint(...); break
    stop.uninstall()

`should_stop` costs one all-reduce of one number per call; the loop may call it every N steps instead, as long as
every rank uses the same N. A second signal while a stop is pending is only recorded again (it never kills the
process mid-checkpoint); the scheduler's hard kill (SIGKILL) is what the atomic checkpoint publication guards against.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _collective_device(group) -> torch.device:
    """Where a small all-reduce tensor must live for the group's backend (NCCL needs the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StopSignal:
    """Records SIGTERM / SIGUSR1 in this process; `should_stop(group)` agrees on it across ranks."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        """The last signal number received by this process (None: none yet)."""
        self.received_at: Optional[float] = None
        self._previous: Dict[int, object] = {}

    @classmethod
    def install(cls, signals: Iterable[int] = DEFAULT_SIGNALS) -> "StopSignal":
        """Create a handler and install it for `signals` (must be called from the main thread)."""
        handler = cls(signals)
        for sig in handler.signals:
            handler._previous[sig] = signal.signal(sig, handler._on_signal)
        return handler

    def uninstall(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        first = self.received is None
        self.received = signum
        self.received_at = time.time()
        if first:
            logger.warning("received %s: will save a checkpoint and stop at the end of the current step",
                           signal.Signals(signum).name)

    @property
    def requested_locally(self) -> bool:
        """Whether this process received a stop signal (no communication)."""
        return self.received is not None

    def request(self) -> None:
        """Ask for a stop from code (e.g. a time limit), exactly as a received signal would."""
        if self.received is None:
            self.received = signal.SIGTERM
            self.received_at = time.time()

    def should_stop(self, group=None) -> bool:
        """Collective over `group` (None: the world): True on every rank iff any rank has a stop request.

        Without an initialised process group this is the local flag."""
        local = self.requested_locally
        if not dist.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=_collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        agreed = bool(flag.item())
        if agreed and not local:
            logger.warning("another rank received a stop signal: stopping at this step")
        return agreed
