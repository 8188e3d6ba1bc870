"""The megatron-core versions megafusion is tested with, and the check of the installed one at import.

MEGATRON_CORE_TESTED is the one statement of the range: setup.py reads it from this file (it cannot import the
package) for its install_requires, requirements-ci.txt and the Dockerfile pin a version inside it (tests/launch/
test_dockerfile.py checks both), and `import megafusion` warns once, naming both versions, when the installed
megatron-core is outside it. megafusion adapts megatron-core internals for CPU (parallel/cpu_compat.py) and builds
on its module specs, so an untested version may run and still be wrong; the warning says so instead of refusing.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata
from typing import Optional, Tuple

MEGATRON_CORE_TESTED = ">=0.16,<0.17"

_warned = False


class UntestedVersionWarning(UserWarning):
    """The installed megatron-core is outside MEGATRON_CORE_TESTED."""


def _release(version: str) -> Tuple[int, ...]:
    """The leading numeric release of a version string: "0.16.1rc2+cu12" -> (0, 16, 1)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _bounds(spec: str = MEGATRON_CORE_TESTED) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    lower, upper = (part.strip() for part in spec.split(","))
    if not (lower.startswith(">=") and upper.startswith("<")):
        raise ValueError(f"MEGATRON_CORE_TESTED={spec!r} must read '>=A,<B'")
    return _release(lower[2:]), _release(upper[1:])


def in_tested_range(version: str, spec: str = MEGATRON_CORE_TESTED) -> bool:
    """Whether `version` lies in `spec` ('>=A,<B'); pre-releases of B count as B (outside)."""
    lower, upper = _bounds(spec)
    release = _release(version)
    return _pad(lower, release) <= release and release < _pad(upper, release)


def _pad(bound: Tuple[int, ...], like: Tuple[int, ...]) -> Tuple[int, ...]:
    return bound + (0,) * max(0, len(like) - len(bound))


def installed_megatron_core() -> Optional[str]:
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def check_megatron_core(version: Optional[str] = None, *, once: bool = True) -> bool:
    """Warn (UntestedVersionWarning, once per process unless once=False) when megatron-core `version` (default:
    the installed one) is outside MEGATRON_CORE_TESTED; returns whether it is inside (True when not installed:
    importing megatron then fails with its own message)."""
    global _warned
    version = installed_megatron_core() if version is None else version
    if version is None:
        return True
    try:
        ok = in_tested_range(version)
    except ValueError:
        ok = False
    if not ok and not (once and _warned):
        _warned = True
        warnings.warn(f"megatron-core {version} is installed but megafusion is tested with megatron-core"
                      f"{MEGATRON_CORE_TESTED}; install a version in that range "
                      f"(pip install 'megatron-core{MEGATRON_CORE_TESTED}') or expect untested behaviour",
                      UntestedVersionWarning, stacklevel=3)
    return ok
