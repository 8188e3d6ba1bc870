"""Peer heartbeats in the rendezvous store: a rank that stops beating is gone, one that shut down has left, and
a collective error caused by a lost peer becomes a PeerLostError naming it and the step."""

import pytest
import torch.distributed as dist

from megafusion.parallel import liveness
from megafusion.parallel.liveness import PeerMonitor, describe_missing, is_peer_failure, name_lost_peers

GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:42124. This is typically caused by a remote worker crashing.")


def test_probe_names_gone_and_left_ranks():
    store = dist.HashStore()
    monitors = [PeerMonitor(store, r, 3, interval=0.05).start() for r in range(3)]
    try:
        assert monitors[0].probe() == ([], [], None)
        monitors[1]._stopped.set()  # rank 1 freezes: its heartbeat stops without a goodbye
        monitors[1]._thread.join()
        monitors[2].stop()  # rank 2 shuts its group down
        assert monitors[0].probe() == ([1], [2], None)
        who, missing = monitors[0].describe()
        assert missing
        assert who == ("rank 1 of 3 is gone (no heartbeat: killed or frozen); rank 2 of 3 has left (shut down "
                       "after an error of its own: see its log)")
        again = PeerMonitor(store, 2, 3, interval=0.05).start()  # a later group in the same store
        assert monitors[0].probe() == ([1], [], None)
        again.stop()
    finally:
        for m in monitors:
            m.stop()


def test_describe_missing_wording():
    assert describe_missing([], [], None, 4) == "every other rank of 4 still has a heartbeat"
    assert describe_missing([1, 3], [], None, 4).startswith("ranks 1, 3 of 4 are gone")
    assert "rendezvous store" in describe_missing([], [], "Connection refused", 4)


def test_peer_failures_are_recognised():
    assert is_peer_failure(RuntimeError(GLOO_CLOSED))
    assert is_peer_failure(RuntimeError("Timed out waiting 300000ms for recv operation to complete"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))


def test_name_lost_peers_passes_other_errors_and_records_the_step():
    with pytest.raises(KeyError):
        with name_lost_peers(lambda: 7):
            assert liveness.last_step() == 7
            raise KeyError("not a collective")
    assert liveness.last_step() is None
    with pytest.raises(RuntimeError, match="Connection closed"):  # no process group: left as it is
        with name_lost_peers(lambda: 7):
            raise RuntimeError(GLOO_CLOSED)
