"""Errors a user fixes, and how the command line reports them: one line naming the file, folder, flag or rank and
the fix, no traceback (MEGAFUSION_DEBUG=1 shows it).

    raise RunError(f"{flag}={path}: cannot write there (Permission denied); choose a writable folder")

`RunError` is the base of megafusion's own start-up and run-time refusals (a held run folder, a dead peer, a
corrupt checkpoint). `ValueError` and `FileNotFoundError` are what config, dataset and checkpoint validation raise
with such messages. An `OSError` for a full disk, a missing permission or a read-only file system is reported with
the path it names. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system"}


class RunError(RuntimeError):
    """A refusal or failure whose message says everything the user needs (what, where, how to fix)."""


def os_error_line(exc: OSError) -> Optional[str]:
    """One line for a disk-side OSError (full disk, permissions, read-only), or None for any other OSError."""
    what = DISK_ERRNOS.get(exc.errno)
    if what is None:
        return None
    where = exc.filename or "(path not reported)"
    hint = ("free space there or point training.run_dir / checkpoint.save_dir elsewhere"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder this user can write")
    return f"{where}: {what}; {hint}"


def user_error_line(exc: BaseException) -> Optional[str]:
    """The one-line report of a user-fixable error, or None when `exc` is a bug (keep its traceback)."""
    if isinstance(exc, (RunError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_line(exc)
    return None


def run_reporting(command: str, body: Callable[[], int]) -> int:
    """Run a command's body; user-fixable errors become one line on stderr and exit status 1, a second Ctrl-C
    (KeyboardInterrupt) exit status 130."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"megafusion {command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - classified below, re-raised when it is a bug
        line = user_error_line(exc)
        if line is None or os.environ.get("MEGAFUSION_DEBUG"):
            raise
        print(f"megafusion {command}: {line}", file=sys.stderr)
        return 1
