"""Which peers are alive, and a dead peer named instead of a bare gloo/NCCL error.

Heartbeats: `initialize_parallel` starts a `PeerMonitor` on every rank of a multi-rank job. A daemon thread adds 1
to the key `megafusion/heartbeat/<rank>` of the rendezvous store every HEARTBEAT_S seconds; it keeps beating
while the main thread waits inside a collective (c10d releases the GIL there), so a stale counter means the
process died or froze, not that it is slow. `destroy_parallel` adds LEFT to the counter: the rank shut down its
process group (it finished, or failed with an error of its own). `PeerMonitor.probe()` reads every counter twice,
2.5 beats apart, and returns the ranks that are gone (no beat in between) and those that left. The probe runs
only when something already went wrong, so the store sees one small write per rank per beat in normal running.

Naming the failure: gloo reports a dead peer as `RuntimeError: ... Connection closed by peer [10.0.0.2]:41234`
(or a timeout after parallel.timeout_minutes when the peer froze); `name_lost_peers(last_step)` wraps the
training run and turns such an error into `PeerLostError("rank 0 of 2: rank 1 of 2 is gone (Connection closed
by peer) after step 12; ...")` (a RunError: `megafusion train` prints it as one line and exits 1), naming the missing ranks from the heartbeats and the last completed step, which
it also records for the stop-signal watchdog (training/signals.py) through `last_step()`. Stop signals (a
launcher's SIGTERM to the surviving ranks) are held back for the few seconds this takes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch.distributed as dist

from megafusion.errors import RunError
from megafusion.utils.processes import discard_held_signals, hold_stop_signals, stop_signal_scope

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
LEFT = 1 << 40  # added to a rank's counter when it shuts down its process group
_PREFIX = "megafusion/heartbeat/"

# Words of the errors a collective raises when a peer died, froze or left (gloo, NCCL, the TCP store).
PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                        "connection refused", "remote worker", "nccl communicator", "socket closed")


class PeerLostError(RunError):
    """A collective failed because a peer rank died, froze or left; the message names it and the step (the command
    line reports it in one line, megafusion/errors.py)."""


class PeerMonitor:
    """This rank's heartbeat in `store`, and `probe()` of everyone else's."""

    def __init__(self, store, rank: int, world_size: int, interval: float = HEARTBEAT_S):
        self.store, self.rank, self.world_size, self.interval = store, rank, world_size, interval
        self.store_error: Optional[str] = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="megafusion-heartbeat", daemon=True)

    def start(self) -> "PeerMonitor":
        count = self.store.add(_PREFIX + str(self.rank), 1)  # the key exists before anyone probes it
        if count >= LEFT:  # this rank left an earlier group in the same store and is back
            self.store.add(_PREFIX + str(self.rank), -LEFT)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.store.add(_PREFIX + str(self.rank), 1)
            except Exception as exc:  # the store's host is gone: the probe will say so
                self.store_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return

    def stop(self) -> None:
        """Stop beating and mark this rank as having left (a clean shutdown, not a death)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval)
        try:
            self.store.add(_PREFIX + str(self.rank), LEFT)
        except Exception:
            pass

    def _counters(self) -> List[int]:
        return [self.store.add(_PREFIX + str(r), 0) for r in range(self.world_size)]

    def probe(self, wait: Optional[float] = None) -> Tuple[List[int], List[int], Optional[str]]:
        """(gone, left, store_error): ranks without a heartbeat over `wait` seconds (default 2.5 beats), ranks
        that shut down their process group, and why the store could not be read (then both lists are empty)."""
        wait = 2.5 * self.interval if wait is None else wait
        try:
            before = self._counters()
            time.sleep(wait)
            after = self._counters()
        except Exception as exc:
            return [], [], str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        left = [r for r in range(self.world_size) if r != self.rank and after[r] >= LEFT]
        gone = [r for r in range(self.world_size)
                if r != self.rank and r not in left and after[r] == before[r]]
        return gone, left, None

    def describe(self, wait: Optional[float] = None) -> Tuple[str, bool]:
        """A phrase naming the missing peers, and whether any peer is missing (or the store is unreachable)."""
        gone, left, store_error = self.probe(wait)
        return describe_missing(gone, left, store_error, self.world_size), bool(gone or left or store_error)


def describe_missing(gone: List[int], left: List[int], store_error: Optional[str], world_size: int) -> str:
    if store_error is not None:
        return (f"the rendezvous store (MASTER_ADDR:MASTER_PORT, hosted by rank 0 unless torchrun's agent hosts "
                f"it) is unreachable ({store_error}), so rank 0 or its node is likely gone")
    parts = []
    if gone:
        parts.append(f"{_ranks(gone)} of {world_size} {'is' if len(gone) == 1 else 'are'} gone (no heartbeat: "
                     f"killed or frozen)")
    if left:
        parts.append(f"{_ranks(left)} of {world_size} {'has' if len(left) == 1 else 'have'} left (shut down after "
                     f"an error of {'its' if len(left) == 1 else 'their'} own: see {'its' if len(left) == 1 else 'their'} log)")
    return "; ".join(parts) if parts else f"every other rank of {world_size} still has a heartbeat"


def _ranks(ranks: List[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


# ---------------------------------------------------------------------------------------------- the process's monitor
_MONITOR: Optional[PeerMonitor] = None
_PROGRESS: Optional[Callable[[], Optional[int]]] = None


def start_monitor(rank: int, world_size: int) -> Optional[PeerMonitor]:
    """Start this process's heartbeat in the default group's store (no-op for a 1-rank group)."""
    global _MONITOR
    stop_monitor()
    if world_size < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    try:
        _MONITOR = PeerMonitor(_get_default_store(), rank, world_size).start()
    except Exception as exc:  # a store without add(): run without heartbeats rather than not at all
        logger.warning("rank %d: no peer heartbeats (%s); a lost peer will be reported without its rank", rank, exc)
        _MONITOR = None
    return _MONITOR


def stop_monitor() -> None:
    global _MONITOR
    if _MONITOR is not None:
        _MONITOR.stop()
    _MONITOR = None


def monitor() -> Optional[PeerMonitor]:
    return _MONITOR


def last_step() -> Optional[int]:
    """The last completed training step, as recorded by `name_lost_peers` (None: not training)."""
    try:
        return _PROGRESS() if _PROGRESS is not None else None
    except Exception:
        return None


def after_step_phrase(step: Optional[int]) -> str:
    if step is None:  # no trainer yet: building the model, loading a checkpoint, opening the data
        return "during start-up"
    return "before the first step" if step == 0 else f"after step {step}"


def is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, PeerLostError):
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in PEER_FAILURE_MARKERS)


def lost_peer_message(exc: BaseException, step: Optional[int]) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mon = _MONITOR
    who = mon.describe()[0] if mon is not None else "a peer rank is gone"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    cause = first.split("] ", 1)[-1].split(". ", 1)[0][:200]  # gloo: "[.../pair.cc:553] Connection closed ..."
    backend = dist.get_backend() if dist.is_initialized() else "c10d"
    return (f"rank {rank} of {world}: {who} {after_step_phrase(step)}; exiting ({backend}: {cause}). "
            f"Check the missing rank's log for why it stopped, then resume from the last checkpoint "
            f"(checkpoint.load=auto); parallel.timeout_minutes bounds how long a rank waits for a frozen peer")


@contextlib.contextmanager
def name_lost_peers(step: Callable[[], Optional[int]]):
    """Turn a collective failing on a lost peer into PeerLostError naming the rank(s) and `step()`."""
    global _PROGRESS
    _PROGRESS = step
    try:
        # A launcher stops the other ranks when one dies (torchrun: SIGTERM within a second, SIGKILL 30 s later),
        # and by then the training loop has removed its stop handler (StopSignal.uninstall holds stop signals
        # when it runs during an error): the error is logged before a held signal is acted on.
        with stop_signal_scope():
            try:
                yield
            except Exception as exc:
                if not is_peer_failure(exc) or not dist.is_initialized() or dist.get_world_size() < 2:
                    raise
                hold_stop_signals()
                logger.error("rank %d of %d: a collective failed %s; finding out which peer is missing",
                             dist.get_rank(), dist.get_world_size(), after_step_phrase(last_step()))
                message = lost_peer_message(exc, last_step())
                discard_held_signals()  # the process ends with PeerLostError: a stop request changes nothing
                raise PeerLostError(message) from exc
    finally:
        _PROGRESS = None
