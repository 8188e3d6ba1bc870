"""Suite-wide setup: helper imports, thread count, GPU-only skips, and the check that no test leaks a process.

Leak check: at start-up the pytest process becomes a child subreaper (Linux PR_SET_CHILD_SUBREAPER), so a process
orphaned by a test (a loader worker or checkpoint writer whose trainer was killed) is re-parented to pytest rather
than to init, and stays visible. At the end of the session every descendant still alive after LEAK_GRACE_S
seconds fails the run, listed with its pid and command line (and is then killed). The one process legitimately alive then is this
process's own multiprocessing resource tracker, which lives until pytest exits by design.
"""

import ctypes
import ctypes.util
import multiprocessing.resource_tracker
import os
import sys
import time

import psutil
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/distributed.py and other helpers

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

LEAK_GRACE_S = 10.0
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(autouse=True)
def _fresh_moe_loss_tracker():
    """megatron's MoE loss tracker is a process-wide dict whose per-layer tensors keep the layer count of the
    first model that logged under a name: each test starts with it empty (models of different depths)."""
    yield
    utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if utils is not None:
        utils.get_moe_layer_wise_logging_tracker().clear()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny model trained for a few steps on a preprocessed corpus (pixel encoder, 8x8 images), shared by the
    generation and conversion tests (tests/inference/trained_run.py)."""
    here = os.path.dirname(__file__)
    for sub in ("inference", "preprocess", "training"):
        if os.path.join(here, sub) not in sys.path:
            sys.path.insert(0, os.path.join(here, sub))
    from trained_run import make_trained_run

    return make_trained_run(tmp_path_factory.mktemp("trained_run"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionstart(session):
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _expected_pids():
    """Descendants that live until pytest exits by design: its own multiprocessing resource tracker."""
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    pid = getattr(tracker, "_pid", None)
    return {pid} if pid else set()


def _leaked():
    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                if child.ppid() == me.pid:
                    os.waitpid(child.pid, os.WNOHANG)  # an orphan re-parented here that has exited: reap it
                continue
            if child.pid not in _expected_pids():
                found.append(child)
        except (psutil.Error, ChildProcessError):
            continue
    return found


def _describe(proc) -> str:
    try:
        return f"pid {proc.pid} ({proc.memory_info().rss >> 20} MB): {' '.join(proc.cmdline())[:300]}"
    except psutil.Error:
        return f"pid {proc.pid} (exited while being listed)"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    deadline = time.time() + LEAK_GRACE_S
    leaked = _leaked()
    while leaked and time.time() < deadline:
        time.sleep(0.25)
        leaked = _leaked()
    if not leaked:
        return
    lines = [_describe(p) for p in leaked]
    message = (f"{len(lines)} process(es) left behind by the tests (still alive {LEAK_GRACE_S:.0f} s after the "
               f"last test; each test must stop what it starts):\n  " + "\n  ".join(lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "leaked processes", red=True)
        reporter.write_line(message)
    else:
        sys.stderr.write(message + "\n")
    for proc in leaked:  # reported: now stop them, so they do not outlive the run
        try:
            proc.kill()
        except psutil.Error:
            pass
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
