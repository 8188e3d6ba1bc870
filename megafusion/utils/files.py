"""Durable files: fsync, write-then-rename publishing, content hashes, and the writable-folder check of a run.

Preprocessing outputs and checkpoints are both published so that a reader (or a resumed run) never sees a
half-written file under its final name: write a temp file in the same folder, fsync it, rename it, fsync the folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where folders cannot be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def publish_file(tmp_path: PathLike, final_path: PathLike) -> None:
    """fsync tmp_path, rename it to final_path, fsync the folder."""
    fsync_file(tmp_path)
    os.replace(tmp_path, final_path)
    fsync_dir(os.path.dirname(os.path.abspath(final_path)))


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
    """Write `data` to `path` through a temp file in the same folder: fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_file_into(digest, path: PathLike) -> None:
    """Feed the bytes of `path` to a hashlib object (chunked: files may be larger than memory)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()


def ensure_writable_dir(path: PathLike, flag: str) -> None:
    """Create `path` if needed and prove it writable (a probe file written and removed), before any compute; the
    error names the flag that set the path and the reason (a file in the way, permissions, a read-only mount)."""
    from megafusion.errors import RunError

    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise RunError(f"{flag}={path}: cannot write there ({e.strerror or e}); choose a writable folder") from None
