"""Stop signals held while an error is reported: deferred inside a scope, re-delivered (or discarded) after."""

import os
import signal

from megafusion.utils.processes import (discard_held_signals, hold_stop_signals, parent_alive,
                                        stop_signal_scope)


def test_held_signals_are_redelivered_after_the_scope():
    seen = []

    def record(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, record)
    try:
        assert not hold_stop_signals()  # outside a scope nothing is held
        with stop_signal_scope():
            assert hold_stop_signals()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == []  # deferred
        assert seen == [signal.SIGUSR1]  # re-delivered to the handler from before
        with stop_signal_scope():
            hold_stop_signals()
            os.kill(os.getpid(), signal.SIGUSR1)
            discard_held_signals()
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is record  # the handler from before is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_parent_alive():
    assert parent_alive(os.getppid())
    assert not parent_alive(os.getppid() + 1)
