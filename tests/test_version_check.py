"""megafusion warns once at import when the installed megatron-core is outside the range it is tested with."""

import warnings

import pytest

from megafusion import version_check
from megafusion.version_check import MEGATRON_CORE_TESTED, UntestedVersionWarning, check_megatron_core


def _warnings(version, once=False):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = check_megatron_core(version, once=once)
    return ok, [w for w in caught if issubclass(w.category, UntestedVersionWarning)]


def test_installed_version_is_in_range_and_silent():
    assert version_check.installed_megatron_core() is not None
    ok, caught = _warnings(None)
    assert ok and caught == []


@pytest.mark.parametrize("version", ["0.17.0", "0.17.0rc1", "0.15.3", "1.0.0", "garbage"])
def test_untested_version_warns_naming_both(version):
    ok, caught = _warnings(version)
    assert not ok and len(caught) == 1
    message = str(caught[0].message)
    assert f"megatron-core {version} is installed" in message and MEGATRON_CORE_TESTED in message


@pytest.mark.parametrize("version", ["0.16", "0.16.0", "0.16.1", "0.16.9.post1", "0.16.2+cu12"])
def test_versions_in_range_do_not_warn(version):
    ok, caught = _warnings(version)
    assert ok and caught == []


def test_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(version_check, "_warned", False)
    assert len(_warnings("0.18.0", once=True)[1]) == 1
    assert _warnings("0.18.0", once=True)[1] == []
