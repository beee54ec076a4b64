"""Helpers shared by the whole test tree (fixtures, server tests, the fault suite, the benchmark
scripts): a free loopback port, a bounded wait, and throw-away PostgreSQL databases.

Only the standard library is imported at the top: the benchmark's load generator imports this
module in every child process it starts.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], timeout: float = 10, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll `predicate` until it returns something truthy and return that value; AssertionError
    naming `what` after `timeout` s. From a coroutine, run it with `asyncio.to_thread` so the
    event loop (and the clients on it) keeps running while it polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def postgres_available(url: str) -> bool:
    """True if a PostgreSQL server answers a query at `url`."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # any failure to connect means "not available", which callers report
        return False
    finally:
        engine.dispose()
    return True


@contextmanager
def postgres_database(server_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database `<prefix>_<random>` on the server `server_url` points at, migrated to head
    unless `migrated=False`; yields its URL, then drops it with any connection still open on it."""
    from sqlalchemy import create_engine, make_url, text

    from ccm.store import migrate

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        try:
            if migrated:
                migrate.upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()
