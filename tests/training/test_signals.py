"""Stop signals: the handler records SIGTERM / SIGUSR1; should_stop agrees across ranks at the same step."""

import json
import os
import signal

import pytest

from distributed import run_distributed
from megafusion.training.signals import REQUESTED, StopSignal


def test_handler_records_and_uninstall_restores():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal.install()
    try:
        assert not stop.should_stop()  # no process group: the local flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1 and stop.should_stop()
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_request_from_code():
    stop = StopSignal()
    assert not stop.requested_locally
    stop.request()
    assert stop.should_stop()
    assert stop.agreed_signal == REQUESTED  # told apart from a signal (training.exit_duration_minutes)


def test_agreed_signal_names_the_signal():
    stop = StopSignal.install()
    try:
        assert stop.agreed_signal is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.agreed_signal == signal.SIGUSR1
    finally:
        stop.uninstall()


def _stop_worker(rank, world_size, out_dir):
    stop = StopSignal.install()
    seen = []
    stopped_at = None
    for step in range(8):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # only this process receives it
        agreed = stop.should_stop()
        seen.append(agreed)
        if agreed:
            stopped_at = step
            break
    stop.uninstall()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"stopped_at": stopped_at, "local": stop.requested_locally, "seen": seen,
                   "agreed_signal": stop.agreed_signal}, f)


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path):
    run_distributed(_stop_worker, world_size=2, args=(str(tmp_path),))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["stopped_at"] == r1["stopped_at"] == 3
    assert r0["seen"] == r1["seen"] == [False, False, False, True]
    assert r1["local"] and not r0["local"]  # rank 0 never got the signal, yet stopped with rank 1
    assert r0["agreed_signal"] == r1["agreed_signal"] == signal.SIGTERM  # and knows which signal it was
