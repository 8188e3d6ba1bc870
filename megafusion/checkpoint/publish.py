"""Atomic publication of checkpoint folders: staging, completion marker, `latest`, keep-last-K, discovery.

The on-disk protocol (all paths under the checkpoint root `save_dir`):

    tmp.iter_0000100/            staging: every rank writes here (dist checkpoint shards, rng/, train state)
    iter_0000100/                a published checkpoint; holds COMPLETE_MARKER, written last before the rename
    latest                       text file: the name of the newest published folder ("iter_0000100")

Save (`stage` then `publish`, called on every rank of the world group):
  1. stage: rank 0 removes stale `tmp.*` folders left by a crashed save, creates a fresh staging folder; barrier.
  2. every rank writes its files into the staging folder.
  3. publish: barrier (every rank finished writing); rank 0 writes the completion marker (which records the size
     of every file in the folder), fsyncs every file and folder of the staging tree, renames it atomically to
     `iter_XXXXXXX`, fsyncs the root, then writes `latest` (temp file + fsync + rename) last; only then are
     published folders beyond the newest `keep_last` (in publication order) deleted, never the one just written
     nor the one `latest` names; barrier.

A crash (or kill -9) at any point leaves either the previous `latest` and its folder intact, or the new one
complete. Discovery never returns a `tmp.*` folder or a folder without its marker: `resolve_load_dir("auto")`
reads `latest`, and falls back to the newest complete `iter_*` when `latest` is missing or points to something
incomplete (a crash between the rename and the `latest` write).

Integrity: `check_files(path)` compares every file the marker lists with its recorded size (a truncated or
missing shard, a file replaced after publication), without reading any tensor; `CorruptCheckpointError` names the
bad file and `previous_complete` the checkpoint to load instead. Markers written before sizes were recorded have
no "files" entry and are not checked. Sizes are taken by rank 0 after the barrier, so `save_dir` must be a file
system where a file closed by one node shows its full size to another (any POSIX or NFS close-to-open mount).

keep_last counts checkpoints in publication order (the marker's time, then the step), so an older run's higher
iteration numbers (a run restarted with checkpoint.overwrite=true, or resumed from an earlier checkpoint) are the
ones removed first, and the checkpoint just published is never removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed as dist

from megafusion.errors import RunError
from megafusion.utils.files import fsync_dir, fsync_tree, write_atomic

logger = logging.getLogger(__name__)

ITER_PREFIX = "iter_"
TMP_PREFIX = "tmp."
LATEST_FILE = "latest"
COMPLETE_MARKER = "megafusion_complete.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
FILES_KEY = "files"


class CorruptCheckpointError(RunError):
    """A published checkpoint whose files do not match the sizes its completion marker recorded."""


def iter_dirname(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps (megatron's 7-digit convention)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{ITER_PREFIX}{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- discovery
def is_complete(path: Path) -> bool:
    """A published checkpoint: named iter_*, and its completion marker exists."""
    path = Path(path)
    return path.is_dir() and _ITER_RE.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def read_marker(path: Path) -> dict:
    with open(Path(path) / COMPLETE_MARKER) as f:
        return json.load(f)


def publication_order(save_dir: Path) -> List[Path]:
    """Complete checkpoints under `save_dir`, oldest publication first (the marker's time, then the step)."""
    keyed = []
    for step, path in list_published(save_dir):
        try:
            when = float(read_marker(path).get("published_unix_time", 0.0))
        except (OSError, ValueError):  # unreadable marker: order it by its folder's time
            when = path.stat().st_mtime
        keyed.append((when, step, path))
    return [path for _, _, path in sorted(keyed)]


def record_files(folder: Path) -> dict:
    """{relative path: size in bytes} of every file under `folder` except the marker (stored in the marker)."""
    folder = Path(folder)
    sizes = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER:
                sizes[rel] = full.stat().st_size
    return dict(sorted(sizes.items()))


def check_files(path: Path) -> Optional[str]:
    """None when every file the marker lists has its recorded size (or the marker lists none: an older
    checkpoint); otherwise a description of the first bad file (missing, or its size and the recorded one)."""
    path = Path(path)
    try:
        recorded = read_marker(path).get(FILES_KEY)
    except (OSError, ValueError) as e:
        return f"its completion marker {path / COMPLETE_MARKER} cannot be read ({e})"
    for rel, size in (recorded or {}).items():
        full = path / rel
        try:
            actual = full.stat().st_size
        except FileNotFoundError:
            return f"{full} is missing"
        if actual != size:
            return f"{full} has {actual} bytes, {size} were written (truncated or overwritten after the save)"
    return None


def previous_complete(path: Path) -> Optional[Path]:
    """The newest other published checkpoint next to `path` whose files check out (None when there is none)."""
    path = Path(path)
    candidates = [p for p in publication_order(path.parent) if p.name != path.name]
    for candidate in reversed(candidates):
        if check_files(candidate) is None:
            return candidate
    return None


def corrupt_message(path: Path, problem: str) -> str:
    """The error for a checkpoint that failed check_files: the bad file and what to load instead."""
    previous = previous_complete(path)
    instead = (f"load the previous complete checkpoint with checkpoint.load={previous}" if previous is not None else
               f"no other complete checkpoint is next to it; start fresh with checkpoint.load=none")
    return (f"checkpoint {path} is corrupt: {problem}. It was not loaded; {instead} (or restore the file from a "
            f"backup)")


def list_published(save_dir: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under `save_dir` as (step, path), oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for entry in save_dir.iterdir():
        m = _ITER_RE.match(entry.name)
        if m and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def read_latest(save_dir: Path) -> Optional[Path]:
    """The folder named by `<save_dir>/latest` when it is complete; None otherwise."""
    latest = Path(save_dir) / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    candidate = Path(save_dir) / name
    if name and _ITER_RE.match(name) and is_complete(candidate):
        return candidate
    logger.warning("%s names %r, which is not a complete checkpoint; looking for the newest complete one",
                   latest, name)
    return None


def find_latest(save_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: `latest` if valid, else the highest complete iter_*; None if none."""
    chosen = read_latest(save_dir)
    if chosen is not None:
        return chosen
    published = list_published(save_dir)
    return published[-1][1] if published else None


def resolve_load_dir(load: str, save_dir: Optional[Path]) -> Optional[Path]:
    """Turn `checkpoint.load` into a folder to load, or None for a fresh start.

    auto: the newest complete checkpoint under `save_dir` (None when there is none yet); none: None;
    anything else: a checkpoint folder (an iter_* folder, or a root holding `latest`) that must be complete.
    """
    if load == "none":
        return None
    if load == "auto":
        return find_latest(save_dir) if save_dir is not None else None
    path = Path(load)
    if is_complete(path):
        return path
    if path.is_dir() and not _ITER_RE.match(path.name):
        found = find_latest(path)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"checkpoint.load={load!r} is not a complete checkpoint: expected an iter_XXXXXXX folder holding "
        f"{COMPLETE_MARKER} (or a checkpoint root with one); partial folders (tmp.*, no marker) are never "
        f"loaded. Use checkpoint.load=auto to resume from the newest complete one, or none to start fresh."
    )


# ---------------------------------------------------------------------------------------------- saving
def stage(save_dir: Path, step: int) -> Path:
    """Collective: clean stale staging folders and create `<save_dir>/tmp.iter_XXXXXXX`; returns its path."""
    save_dir = Path(save_dir)
    staging = save_dir / f"{TMP_PREFIX}{iter_dirname(step)}"
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for entry in save_dir.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                logger.warning("removing stale partial checkpoint %s (left by an interrupted save)", entry)
                shutil.rmtree(entry, ignore_errors=True)
        staging.mkdir()
        fsync_dir(save_dir)
    _barrier()
    return staging


def publish(save_dir: Path, step: int, keep_last: int, marker: dict) -> Path:
    """Collective: after every rank wrote into the staging folder, make it the published `iter_XXXXXXX`.

    `marker` is stored as the completion marker (JSON) together with the step and the publication time.
    Returns the published folder. Older published checkpoints beyond `keep_last` are removed afterwards.
    """
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1, got {keep_last}")
    save_dir = Path(save_dir)
    name = iter_dirname(step)
    staging, final = save_dir / f"{TMP_PREFIX}{name}", save_dir / name
    _barrier()  # every rank finished writing its files
    if _rank() == 0:
        if not staging.is_dir():
            raise FileNotFoundError(f"staging folder {staging} is missing: call checkpoint.publish.stage first")
        body = dict(marker, step=step, published_unix_time=time.time(), **{FILES_KEY: record_files(staging)})
        with open(staging / COMPLETE_MARKER, "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
        fsync_tree(staging)
        if final.exists():  # re-saving a step already published (e.g. resumed, then stopped at once)
            replaced = save_dir / f"{TMP_PREFIX}replaced.{name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        fsync_dir(save_dir)
        write_atomic(save_dir / LATEST_FILE, name + "\n")
        shutil.rmtree(save_dir / f"{TMP_PREFIX}replaced.{name}", ignore_errors=True)
        prune(save_dir, keep_last, just_written=final)
    _barrier()
    return final


def prune(save_dir: Path, keep_last: int, just_written: Optional[Path] = None) -> List[Path]:
    """Delete published checkpoints beyond the newest `keep_last` in publication order; never `just_written` nor
    the one `latest` names."""
    published = publication_order(save_dir)
    keep = set(published[-keep_last:])
    for never in (just_written, read_latest(save_dir)):
        if never is not None:
            keep.add(Path(never))
    removed = []
    for path in published:
        if path not in keep:
            # rename first: a crash mid-delete leaves a tmp.* folder (cleaned by the next save), never a
            # half-deleted iter_* folder that still carries its completion marker
            doomed = path.with_name(f"{TMP_PREFIX}deleting.{path.name}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_dir(Path(save_dir))
        logger.info("removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed
