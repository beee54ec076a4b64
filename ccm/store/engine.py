"""make_engine(url): SQLite pragmas (WAL, synchronous, foreign keys); Postgres pool options and
connection timeouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL

from ccm.config import SqliteSynchronous


def normalise_url(url: str | URL) -> URL:
    """Use psycopg 3 for plain `postgresql://` URLs (SQLAlchemy would pick psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(
    url: str | URL,
    *,
    sqlite_synchronous: SqliteSynchronous = SqliteSynchronous.NORMAL,
    pool_size: int = 5,
) -> Engine:
    """An engine for `url`; a SQLite file's folder is created, and WAL is switched on."""
    parsed = normalise_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(parsed, **kwargs)
        _install_sqlite_pragmas(engine, sqlite_synchronous)
        return engine
    kwargs.update(pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    if parsed.get_driver_name() in {"psycopg", "psycopg2"}:  # libpq options
        # What the URL does not set itself (its query string wins).
        kwargs["connect_args"] = {
            name: value for name, value in POSTGRES_CONNECT_ARGS.items() if name not in parsed.query
        }
    return create_engine(parsed, **kwargs)


POSTGRES_CONNECT_ARGS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq options for every Postgres connection, so a network partition fails a connection in
about a minute instead of the kernel's defaults (two hours of silence before the first keepalive
probe; about 15 minutes of retransmissions for a request the server never acknowledged): a
connection attempt gives up after `connect_timeout` seconds; an idle connection, or one waiting
for a reply, is probed after 30 s of silence and dropped after 3 unanswered probes 10 s apart;
data sent but unacknowledged for `tcp_user_timeout` ms (a COMMIT into a partition) drops the
connection. The store writer then sees an error and retries, instead of hanging its thread."""


def _install_sqlite_pragmas(engine: Engine, synchronous: SqliteSynchronous) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={SqliteSynchronous(synchronous).value}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        # A session row goes into seven B-trees (table, primary key, six indexes), several at
        # random places; SQLite's default 2 MB page cache misses on them once the file outgrows
        # it. Pages are only cached as they are read, so a small database stays small in memory.
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.close()
