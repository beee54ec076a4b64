"""One server per SQLite file: `ccm serve` holds an exclusive lock on `<database>.lock` for its
lifetime, so a second server on the same file refuses to start, at once, before touching it.

The lock is an flock(2) on the lock file, released by the kernel when the process ends (a
kill -9 included); the file holds the pid and start time of the holder, for the refusal.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from sqlalchemy import make_url

from ccm.errors import CcmError

_held: dict[Path, int] = {}
"""Lock files this process holds, and their descriptors (held until the process ends)."""


class DatabaseInUse(CcmError):
    """Another ccm server is running on this SQLite file."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database, or an in-memory one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def hold_sqlite_file(url: str) -> None:
    """Take the file's lock for this process, or raise DatabaseInUse naming the holder.
    Idempotent within a process; a no-op for other databases."""
    path = sqlite_path(url)
    if path is None:
        return
    lock = path.parent / (path.name + ".lock")
    if lock.resolve() in _held:
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise DatabaseInUse(
            f"{path} is in use by another ccm server ({holder}): stop it first, or give this "
            "one its own database (--database-url or CCM_DATABASE_URL; several servers on one "
            "database need PostgreSQL)"
        ) from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.write(fd, f"pid {os.getpid()}, started {started}".encode())
    _held[lock.resolve()] = fd


def release_sqlite_file(url: str) -> None:
    """Let go of the file's lock (tests that start several servers in one process, in turn)."""
    path = sqlite_path(url)
    if path is None:
        return
    fd = _held.pop((path.parent / (path.name + ".lock")).resolve(), None)
    if fd is not None:
        os.close(fd)
