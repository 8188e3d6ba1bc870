"""kill -9 in the middle of a save leaves the previous checkpoint as `latest`; resuming loads it, and the next
save removes the partial folder."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "crash_save_script.py")


@pytest.mark.distributed
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, SCRIPT, "save", str(root)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (root / "writing_step_2").exists():
            assert proc.poll() is None, f"save script exited early: {proc.stderr.read().decode()[-3000:]}"
            assert time.time() < deadline, "save script never reached the save of step 2"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the writer processes it started
        proc.wait()
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert (root / "tmp.iter_0000002").is_dir() and any((root / "tmp.iter_0000002").iterdir())
    assert not (root / "iter_0000002").exists()

    done = subprocess.run([sys.executable, SCRIPT, "resume", str(root)], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    r = json.loads((root / "resume.json").read_text())
    assert r["loaded_from"] == "iter_0000001" and r["step"] == 1 and r["consumed_samples"] == 4
    assert r["weights_equal"]
    assert r["tmp_before_save"] == ["tmp.iter_0000002"]  # never loaded, still there until the next save
    assert r["tmp_after_save"] == [] and r["latest_after_save"] == "iter_0000002"
