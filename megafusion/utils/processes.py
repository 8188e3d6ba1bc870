"""Process lifetime: helper processes die with the process that started them, even when it is killed with -9.

A trainer starts helper processes with multiprocessing: data loader workers (data/workers.py) and, at every
checkpoint save, megatron dist_checkpointing's writer processes (forked by its FileSystemWriterAsync). Nothing
stops an orphan when its parent is SIGKILLed (out-of-memory killer, the scheduler's hard kill): loader workers
wait for credits forever and keep hundreds of MB each. So a loader worker calls `become_helper()` first:

  * `die_with_parent()`: Linux PR_SET_PDEATHSIG = SIGKILL (the kernel kills the child when the thread that
    forked it exits, so children are started from the main thread), then a check that the parent is still the
    one that forked it (it may have died before the prctl). `parent_alive(pid)` is the portable fallback a
    worker loop polls (os.getppid() changes when a process is re-parented).
  * stop signals left to the parent: SIGINT, SIGTERM and SIGUSR1 reach every process of a terminal's foreground
    group or a SLURM step; the trainer acts on them (save, then close its helpers), so a helper ignores them
    rather than dying under a save in progress. It also drops the inherited signal wake-up fd
    (signal.set_wakeup_fd), which would otherwise report the helper's signals to the parent's stop watchdog.

Holding stop signals: when a rank's collective fails because a peer died, a launcher stops the surviving ranks
(torchrun sends SIGTERM within a second) while the training loop has already removed its stop handler; inside a
`stop_signal_scope()`, `hold_stop_signals()` defers SIGINT / SIGTERM / SIGUSR1 until the scope ends (then they are
re-delivered, unless `discard_held_signals()` says the process is ending anyway), so the error is reported first.

`tie_forked_children()` makes every multiprocessing child this process forks from then on die with it and drop
the wake-up fd (megatron's writers, which megafusion cannot hand a start-up function); it is idempotent and
leaves signal dispositions alone (a multiprocessing Pool stops its workers with SIGTERM). A forked writer keeps
the handlers it inherited: under the trainer's StopSignal, stop signals are only recorded, so the save goes on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux); exit at once when the parent
    `parent_pid` is already gone. Returns False where prctl is unavailable (poll `parent_alive` instead)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not parent_alive(parent_pid):
        os._exit(1)  # the parent died between fork and prctl: nobody will ever read our results
    return armed


def parent_alive(parent_pid: int) -> bool:
    """Whether this process is still the child of `parent_pid` (a re-parented orphan sees another parent)."""
    return os.getppid() == parent_pid


def drop_wakeup_fd() -> None:
    """Forget a signal wake-up fd inherited through fork: it is the parent's (training/signals.py)."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread
        pass


def leave_stop_signals_to_parent() -> None:
    """Ignore SIGINT / SIGTERM / SIGUSR1 and drop an inherited signal wake-up fd (main thread of the child)."""
    drop_wakeup_fd()
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:
            pass


def become_helper(parent_pid: int) -> None:
    """Everything a helper process does first: die with `parent_pid`, leave stop signals to it."""
    die_with_parent(parent_pid)
    leave_stop_signals_to_parent()


class _Registration:
    """The (weak-referenceable) key multiprocessing's after-fork registry holds for as long as it lives."""


_REGISTRATION = None


def _after_fork(registration) -> None:
    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else os.getppid())
    drop_wakeup_fd()


def tie_forked_children() -> None:
    """From now on, every multiprocessing child forked by this process dies with it and drops the wake-up fd."""
    global _REGISTRATION
    if _REGISTRATION is None:
        _REGISTRATION = _Registration()
        multiprocessing.util.register_after_fork(_REGISTRATION, _after_fork)


# ---------------------------------------------------------------------------------------------- holding stop signals
_SCOPES = 0
_HELD: dict = {}  # signal -> the handler to restore
_PENDING: list = []


def _defer(signum, frame) -> None:
    _PENDING.append(signum)


@contextlib.contextmanager
def stop_signal_scope():
    """A region in which `hold_stop_signals()` may defer stop signals; on leaving it they are released."""
    global _SCOPES
    _SCOPES += 1
    try:
        yield
    finally:
        _SCOPES -= 1
        if _SCOPES == 0:
            release_stop_signals()


def hold_stop_signals() -> bool:
    """Inside a stop_signal_scope (main thread): record SIGINT / SIGTERM / SIGUSR1 instead of acting on them."""
    if _SCOPES == 0 or _HELD:
        return bool(_HELD)
    try:
        for sig in STOP_SIGNALS:
            _HELD[sig] = signal.signal(sig, _defer)
    except ValueError:  # not the main thread
        release_stop_signals()
        return False
    return True


def discard_held_signals() -> None:
    """Forget the deferred signals: the process is ending anyway (with an error that says why)."""
    _PENDING.clear()


def release_stop_signals() -> None:
    """Restore the handlers from before `hold_stop_signals` and re-deliver the signals deferred meanwhile."""
    pending = list(dict.fromkeys(_PENDING))
    _PENDING.clear()
    for sig, handler in _HELD.items():
        signal.signal(sig, handler)
    _HELD.clear()
    for sig in pending:
        os.kill(os.getpid(), sig)
