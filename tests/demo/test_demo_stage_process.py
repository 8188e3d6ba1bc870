"""A demo stage's process: stop signals sent to the demo reach it once, and it dies with the demo (kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil

from megafusion.demo.pipeline import run_stage

CHILD = textwrap.dedent("""
    import signal, sys, time
    seen = []
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    open(sys.argv[1], "w").write("ready")
    deadline = time.time() + 60
    while not seen and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # still stopping: a second signal would arrive now if the demo forwarded twice
    open(sys.argv[1], "w").write(f"stopped after {len(seen)} signal(s)")
""")


def _wait_for(path, text, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and open(path).read().startswith(text):
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never said {text!r}")


def test_a_stop_signal_is_forwarded_once_and_the_stage_finishes(tmp_path):
    marker = str(tmp_path / "marker")

    def signal_twice():
        _wait_for(marker, "ready")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=signal_twice)
    thread.start()
    rc, stopped = run_stage([sys.executable, "-c", CHILD, marker], dict(os.environ))
    thread.join()
    assert (rc, stopped) == (0, "SIGTERM")
    assert open(marker).read() == "stopped after 1 signal(s)"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the demo's own handlers are restored"


def test_the_stage_dies_with_the_demo(tmp_path):
    marker = str(tmp_path / "marker")
    demo = textwrap.dedent(f"""
        import os, sys
        from megafusion.demo.pipeline import run_stage
        run_stage([sys.executable, "-c", {CHILD!r}, {marker!r}], dict(os.environ))
    """)
    parent = subprocess.Popen([sys.executable, "-c", demo])
    try:
        _wait_for(marker, "ready")
        children = psutil.Process(parent.pid).children()
        assert len(children) == 1
        parent.kill()
        parent.wait()
        _wait_for(marker, "stopped after 1 signal(s)")  # SIGTERM from the kernel: a training stage saves
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        parent.kill()
