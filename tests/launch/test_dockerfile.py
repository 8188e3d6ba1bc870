"""The Dockerfile agrees with the pins CI tests: its base is an NGC PyTorch image, its megatron-core pin is
requirements-ci.txt's and lies in megafusion.version_check.MEGATRON_CORE_TESTED, which setup.py also uses, and its
build check runs the CPU test subset. (No Docker engine runs here; the file is parsed.)"""

import re
import runpy
from pathlib import Path
from unittest import mock

import setuptools

from megafusion.version_check import MEGATRON_CORE_TESTED, in_tested_range

ROOT = Path(__file__).resolve().parents[2]


def _pins(text: str) -> dict:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"';]*)", text)}


def _setup_kwargs() -> dict:
    with mock.patch.object(setuptools, "setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return setup.call_args.kwargs


def test_dockerfile_base_and_megatron_pin_match_ci():
    docker = (ROOT / "Dockerfile").read_text()
    tag = re.search(r"^ARG NGC_TAG=(\S+)$", docker, re.M)
    assert tag and re.fullmatch(r"\d\d\.\d\d-py3", tag.group(1)), "ARG NGC_TAG=YY.MM-py3 expected"
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}$", docker, re.M)
    ci = _pins((ROOT / "requirements-ci.txt").read_text())
    pinned = _pins(docker)
    assert pinned["megatron-core"] == ci["megatron-core"] == "0.16.1"
    assert in_tested_range(pinned["megatron-core"])


def test_setup_reads_the_tested_range_and_offers_the_installed_extras():
    kwargs = _setup_kwargs()
    requires = kwargs["install_requires"]
    assert f"megatron-core{MEGATRON_CORE_TESTED}; python_version<'3.12'" in requires
    extras = kwargs["extras_require"]
    assert "wandb" in extras and "gpu" in extras
    docker = (ROOT / "Dockerfile").read_text()
    installed = re.search(r'-e "\.\[([a-z,]+)\]"', docker)
    assert installed, "the Dockerfile installs megafusion with `pip install -e \".[extras]\"`"
    assert set(installed.group(1).split(",")) <= set(extras)


def test_dockerfile_build_check_runs_the_cpu_subset():
    docker = (ROOT / "Dockerfile").read_text()
    check = re.search(r'^RUN .*python -m pytest .*-m "([^"]+)"', docker, re.M)
    assert check, "the Dockerfile runs the CPU tests as its build check"
    assert check.group(1) == "not slow and not distributed and not gpu"
    markers = (ROOT / "pytest.ini").read_text()
    for marker in ("slow", "distributed", "gpu"):
        assert re.search(rf"^\s+{marker}:", markers, re.M)
