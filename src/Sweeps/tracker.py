"""The progress tracker of sweeps: one JSON file keyed by run id, rewritten atomically, and its lock.

A master killed by ``kill -9`` leaves a consistent tracker behind (every write replaces the file whole), and the
lock file is released by the kernel when its holder dies, so a second master is refused only while the first lives.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from src.Sweeps.grid import SweepError


STATES = ("pending", "running", "done", "diverged", "failed", "interrupted")  # a run's status in the tracker
REQUIRED_ENTRY = {"status", "attempts", "failures", "pid", "exit_code", "started", "rounds_done"}


class TrackerLocked(RuntimeError):
    """Another master holds the tracker's lock file."""


def now() -> str:
    """Local time as ``YYYY-MM-DDTHH:MM:SS``."""
    return datetime.now().isoformat(timespec="seconds")


def read_tracker(path: str | Path) -> dict[str, Any]:
    """The tracker's content (an empty tracker when the file does not exist).

    Raises:
        SweepError: the file exists but is not a tracker.
    """
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise SweepError(f"tracker {str(path)!r}: its folder {str(path.parent)!r} does not exist or is a file")
        return {"format": 1, "sweeps": {}, "runs": {}}
    if not path.is_file():
        raise SweepError(f"tracker {str(path)!r} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SweepError(f"tracker {str(path)!r} is unreadable ({err}); move it away to start afresh") from err
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict) or \
            not isinstance(data.setdefault("sweeps", {}), dict):
        raise SweepError(f"tracker {str(path)!r} has no 'runs' and 'sweeps' tables; move it away to start afresh")
    for run, entry in data["runs"].items():
        if not isinstance(entry, dict) or not REQUIRED_ENTRY.issubset(entry) or entry.get("status") not in STATES:
            raise SweepError(f"tracker {str(path)!r}: the entry of run {run} is damaged ({str(entry)[:80]}); move "
                             f"the tracker away to start afresh")
    return data


@contextlib.contextmanager
def tracker_lock(path: Path):
    """Hold ``<tracker>.lock`` (fcntl) for the block; the kernel drops it if the master dies, even by kill -9.

    Raises:
        TrackerLocked: another master holds it (its pid is in the message).
    """
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (O_CLOEXEC by default)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise TrackerLocked(f"another master (pid {holder}) is running with tracker {str(path)!r}; "
                                f"wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
