"""Graceful stop on SIGTERM / SIGUSR1 / Ctrl-C, agreed by every rank, and a watchdog for when it cannot be.

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

`should_stop` costs one all-reduce of one number per call (the signal number, so every rank also agrees on which
signal it was: `agreed_signal`); the loop may call it every N steps instead, as long as
every rank uses the same N. A second SIGTERM / SIGUSR1 while a stop is pending is only recorded again (it never
kills the process mid-checkpoint); the scheduler's hard kill (SIGKILL) is what the atomic checkpoint publication
guards against. Ctrl-C (SIGINT) stops like SIGTERM the first time; the second one aborts at once, without saving
(exit status 130).

The watchdog: while the main thread waits inside a collective (gloo, NCCL), Python runs no signal handler, so a
rank whose peer froze or died would ignore SIGTERM until parallel.timeout_minutes. `install` therefore also
routes signals through `signal.set_wakeup_fd` to a daemon thread, which sees them at once. When a stop signal is
not acted on (should_stop has not returned True) within GRACE_S seconds, the thread probes the peers' heartbeats
(parallel/liveness.py); if a peer is gone (no heartbeat: frozen, or its node is lost), no rank can complete the
step nor save a consistent checkpoint, so it logs which rank is missing and the last completed step and exits
with status 128 + signal. Otherwise the step is merely slow: it probes again later (back-off up to 30 s), and the
loop stops normally. (A peer that exited closed its connections: the collective fails by itself, and
parallel/liveness.py names the peer in that error.)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

from megafusion.parallel import liveness
from megafusion.parallel.initialize import collective_device
from megafusion.utils.processes import hold_stop_signals

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
GRACE_S = 3.0  # after a stop signal, how long the step may run on before the watchdog probes the peers
MAX_PROBE_INTERVAL_S = 30.0
REQUESTED = 65  # not a signal number (those end at 64): a stop asked for by code, `StopSignal.request()`


class StopSignal:
    """Records SIGTERM / SIGUSR1 / SIGINT in this process; `should_stop(group)` agrees on it across ranks."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, grace_s: float = GRACE_S):
        self.signals = tuple(int(s) for s in signals)
        self.grace_s = grace_s
        self.received: Optional[int] = None
        """The last signal number received by this process (None: none yet)."""
        self.received_at: Optional[float] = None
        self.signalled: Optional[int] = None
        """The last signal number this process really received (request() leaves it None)."""
        self.acted = False
        """should_stop has returned True: the loop is stopping (saving), the watchdog leaves it alone."""
        self.agreed_signal: Optional[int] = None
        """Once should_stop returned True: the highest signal number any rank received, or REQUESTED when the stop
        was asked for by code (request(): the wall-clock budget), which outranks every signal; every rank holds the
        same value. Launchers tell a save-and-requeue (SIGUSR1) from a cancellation (SIGTERM) by it
        (training/exit_record.py)."""
        self._lock = threading.RLock()
        self._previous: Dict[int, object] = {}
        self._watchdog: Optional[_Watchdog] = None

    @classmethod
    def install(cls, signals: Iterable[int] = DEFAULT_SIGNALS, grace_s: float = GRACE_S) -> "StopSignal":
        """Create a handler, install it for `signals` and start the watchdog (must be called from the main
        thread)."""
        handler = cls(signals, grace_s)
        for sig in handler.signals:
            handler._previous[sig] = signal.signal(sig, handler._on_signal)
        handler._watchdog = _Watchdog(handler)
        return handler

    def uninstall(self) -> None:
        """Stop the watchdog and restore the handlers that were installed before. Called while an error unwinds
        (a lost peer), it keeps stop signals deferred until that error is reported (utils/processes.py)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if sys.exc_info()[1] is not None:
            hold_stop_signals()
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    def _on_signal(self, signum, frame) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        with self._lock:
            first = self.received is None
            self.received = self.signalled = signum
            if first:
                self.received_at = time.time()
        if first:
            logger.warning("received %s: will save a checkpoint and stop at the end of the current step%s",
                           signal.Signals(signum).name,
                           " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "")

    @property
    def requested_locally(self) -> bool:
        """Whether this process received a stop signal (no communication)."""
        return self.received is not None

    def request(self) -> None:
        """Ask for a stop from code (e.g. a time limit), exactly as a received signal would."""
        with self._lock:
            if self.received is None:
                self.received = signal.SIGTERM
                self.received_at = time.time()

    def should_stop(self, group=None) -> bool:
        """Collective over `group` (None: the world): True on every rank iff any rank has a stop request.

        Without an initialised process group this is the local flag."""
        local = self.requested_locally
        if not dist.is_initialized():
            if local:
                self.agreed_signal = self.signalled or REQUESTED
            self.acted = self.acted or local
            return local
        # The signal number itself (0: none) is reduced, so every rank also agrees on which signal stopped it.
        code = self.signalled or (REQUESTED if local else 0)
        flag = torch.tensor([code], dtype=torch.int32, device=collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        agreed = bool(flag.item())
        if agreed:
            self.agreed_signal = int(flag.item())
            if not local:
                logger.warning("another rank received a stop signal: stopping at this step")
        self.acted = self.acted or agreed
        return agreed


class _Watchdog:
    """The thread that sees signals through the wake-up fd, even while the main thread is blocked in C++."""

    def __init__(self, stop: StopSignal):
        self.stop = stop
        self._read, self._write = socket.socketpair()
        self._read.settimeout(0.5)
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._closed = threading.Event()
        self._interrupts = 0
        self._thread = threading.Thread(target=self._run, name="megafusion-stop-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        signal.set_wakeup_fd(self._previous_fd)
        self._thread.join(timeout=5)
        self._read.close()
        self._write.close()

    def _run(self) -> None:
        first_at: Optional[float] = None
        next_probe, interval = float("inf"), self.stop.grace_s
        while not self._closed.is_set():
            try:
                data = self._read.recv(64)
            except socket.timeout:
                data = b""
            except OSError:
                return
            for signum in data:
                if signum not in self.stop.signals:
                    continue
                self.stop._record(signum)
                if signum == signal.SIGINT:
                    self._interrupts += 1
                    if self._interrupts >= 2:
                        _exit_now(128 + signum, f"{_whoami()}: second interrupt (Ctrl-C): aborting without saving "
                                                f"{liveness.after_step_phrase(liveness.last_step())}")
                if first_at is None:
                    first_at = time.monotonic()
                    next_probe = first_at + self.stop.grace_s
            if self.stop.acted or time.monotonic() < next_probe:
                continue
            monitor = liveness.monitor()
            if monitor is None:  # one process, nothing to wait for: the loop will get to should_stop
                next_probe = float("inf")
                continue
            gone, left, store_error = monitor.probe()
            # Only a silent peer blocks a collective for good: one that exited closed its connections, so the
            # collective fails by itself, and a peer that left (or a store host that exited) may simply have
            # finished its last save before this rank.
            if gone and not self.stop.acted and not self._closed.is_set():
                who = liveness.describe_missing(gone, left, store_error, monitor.world_size)
                signum = self.stop.received or signal.SIGTERM
                _exit_now(128 + signum, (
                    f"{_whoami()}: received {signal.Signals(signum).name} but the current step cannot complete: "
                    f"{who}. No consistent checkpoint can be saved without every rank; exiting "
                    f"{liveness.after_step_phrase(liveness.last_step())} with status {128 + signum}. Resume "
                    f"from the last checkpoint (checkpoint.load=auto)"))
            interval = min(2 * interval, MAX_PROBE_INTERVAL_S)
            next_probe = time.monotonic() + interval


def _whoami() -> str:
    if dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return f"process {os.getpid()}"


def _exit_now(status: int, message: str) -> None:
    """Log `message`, flush what can be flushed, and end the process at once (helpers die with it)."""
    logger.error("%s", message)
    for handler in logging.getLogger().handlers + logger.handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)
