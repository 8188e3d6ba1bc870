"""One run per run folder: the run-folder lock, and the refusal to start a fresh run over another run's checkpoints.

    lock = claim_run_folder(cfg, save_dir)     # collective, right after the process groups exist
    try: ... train ...
    finally: lock.release()                    # rank 0 holds it; other ranks get None

The lock. Rank 0 takes an exclusive POSIX record lock (fcntl.lockf, non-blocking) on `<training.run_dir>/.lock`
and keeps the file open for the run's lifetime; it writes its holder (pid, host, start time, command line) into
the file. A second `megafusion train` on the same folder fails at start-up with RunFolderBusy naming that holder,
on every rank, before any model is built. The kernel drops the lock when the holding process exits in any way,
kill -9 included, so a crashed run never leaves the folder stuck; the file and its stale text may stay, which is
harmless. POSIX locks (rather than flock) because they belong to the process, not to the open file: loader
workers or checkpoint writers forked by the trainer do not inherit them, so a child that outlives a killed trainer
cannot keep the folder locked. Within one process the lock is also recorded, so a second claim from the same
process is refused too (POSIX locks never conflict within a process).

File systems: local disks and NFSv4 (and NFSv3 with lockd) honour these locks across hosts; on NFS a crashed
holder's lock is released when the server notices (the NFSv4 lease, typically 90 s), so a restart right after a
node failure may be refused for that long. Where the file system has no locking at all (some FUSE or Lustre mounts
without -o flock/localflock), the run warns that the folder is not protected and continues.

The fresh-start check. With checkpoint.load=none, a checkpoint root (checkpoint.save_dir, or
`<run_dir>/checkpoints`) that already holds published checkpoints belongs to another run: starting over there
would interleave two runs' checkpoints and `latest`. It is refused (RunError naming the folder, its newest
checkpoint and the two fixes: checkpoint.load=auto to resume it, checkpoint.overwrite=true to start over; the old
checkpoints then give way to the new run's under checkpoint.keep_last). checkpoint.load=auto on a folder without
checkpoints is a fresh start and needs no flag.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Set

import torch.distributed as dist

from megafusion.checkpoint import publish
from megafusion.errors import RunError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_HELD_HERE: Set[str] = set()
"""Real paths of the lock files this process holds (POSIX locks do not conflict within one process)."""


class RunFolderBusy(RunError):
    """Another live run holds the run folder's lock."""


def _holder_text(fd: int) -> str:
    """What the holder wrote into the lock file, as one phrase (it may not have written it yet: wait briefly)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        if raw.strip():
            try:
                h = json.loads(raw)
                return (f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')} "
                        f"({h.get('command', '?')})")
            except ValueError:
                return raw.decode(errors="replace").strip()
        time.sleep(0.1)
    return "a process that has not written its details yet"


class RunFolderLock:
    """The exclusive lock on `<run_dir>/.lock` (see the module docstring); `acquire` raises RunFolderBusy."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None
        self._key = ""

    def acquire(self) -> "RunFolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = os.path.realpath(self.path)
        if self._key in _HELD_HERE:
            raise RunFolderBusy(f"training.run_dir={self.path.parent} is already used by a run in this process "
                                f"(pid {os.getpid()}); give each run its own training.run_dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                holder = _holder_text(fd)
                os.close(fd)
                raise RunFolderBusy(
                    f"training.run_dir={self.path.parent} is in use by another run: {holder} holds {self.path}. "
                    f"Wait for it to finish or stop it, or give this run another training.run_dir") from None
            os.close(fd)
            logger.warning("cannot lock %s (%s): this file system does not support locks, so nothing stops a "
                           "second run from using training.run_dir=%s at the same time", self.path,
                           e.strerror or e, self.path.parent)
            return self
        self._fd = fd
        _HELD_HERE.add(self._key)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the holder text and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD_HERE.discard(self._key)


def check_fresh_start(load: str, overwrite: bool, save_dir: Path) -> None:
    """RunError when checkpoint.load=none would start a new run over the published checkpoints in `save_dir`."""
    if load != "none":
        return
    published = publish.list_published(save_dir)
    if not published:
        return
    newest = publish.find_latest(save_dir) or published[-1][1]
    if overwrite:
        logger.warning("checkpoint.overwrite=true: starting a fresh run in %s, which holds %d checkpoint(s) of "
                       "another run (newest %s); they are removed as this run's checkpoints replace them "
                       "(checkpoint.keep_last)", save_dir, len(published), newest.name)
        return
    raise RunError(f"checkpoint.load=none starts a fresh run, but {save_dir} already holds {len(published)} "
                   f"checkpoint(s) of another run (newest {newest}). Set checkpoint.load=auto to resume it, "
                   f"checkpoint.overwrite=true to start over there anyway, or choose another training.run_dir / "
                   f"checkpoint.save_dir")


def claim_run_folder(cfg, save_dir: Path) -> Optional[RunFolderLock]:
    """Collective: rank 0 locks the run folder and checks the fresh-start rule; every rank raises the same error
    when either fails. Returns the held lock on rank 0, None on other ranks."""
    lock, error = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        try:
            lock = RunFolderLock(cfg.training.run_dir).acquire()
            check_fresh_start(cfg.checkpoint.load, cfg.checkpoint.overwrite, Path(save_dir))
        except RunError as e:
            error = (type(e).__name__, str(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        if lock is not None:
            lock.release()
        kind, message = error
        raise (RunFolderBusy if kind == RunFolderBusy.__name__ else RunError)(message)
    return lock
