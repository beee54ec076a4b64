"""make_engine(url): SQLite pragmas (WAL, synchronous, foreign keys); Postgres pool options and
connection timeouts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, NoSuchModuleError

from ccm.config import SqliteSynchronous
from ccm.settings_report import mask_url


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


SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_URL_EXAMPLES = "sqlite:///path/to/ccm.db or postgresql+psycopg://user:password@host:5432/dbname"


def _backend(url: str) -> str | None:
    try:
        return make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001 - any parse failure means "no backend we can name"
        return None


def _postgres_problem(text: str, parsed: URL) -> str | None:
    """What a psycopg connection error means, and what to do, from its message."""
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if match := re.search(r'database "([^"]+)" does not exist', text):
        name = match.group(1)
        return (
            f"database '{name}' does not exist on {where}: create it "
            f"(createdb -h {parsed.host or 'localhost'} -U {parsed.username or 'postgres'} {name})"
            " or fix the name in the URL"
        )
    if match := re.search(r'role "([^"]+)" does not exist', text):
        return f"PostgreSQL on {where} has no user '{match.group(1)}': fix the user in the URL"
    if "password authentication failed" in text or "no password supplied" in text:
        return f"PostgreSQL on {where} refused the login: check the user and password in the URL"
    if "Connection refused" in text:
        return (
            f"nothing accepts connections on {where}: is PostgreSQL running there, and are the "
            "host and port in the URL right?"
        )
    if "failed to resolve host" in text or "could not translate host name" in text:
        return f"host '{parsed.host}' is unknown: fix the host in the URL"
    if "timeout expired" in text or "timed out" in text:
        return f"no answer from {where} in time: check the host, the port and any firewall"
    if "no pg_hba.conf entry" in text:
        return f"PostgreSQL on {where} does not let this host in: see its pg_hba.conf"
    return None


def describe_database_error(exc: BaseException, url: str) -> str:
    """One line for an operator: which database (password masked), what failed, what to do.

    For errors opening, migrating or querying the database from the command line (`ccm serve`,
    `db`, `audit`, `cleanup`, `config check`); the traceback is for `--debug`."""
    shown = mask_url(url)
    backend = _backend(url)
    if backend is None:
        return f"database URL '{shown}' is not a URL: write {_URL_EXAMPLES}"
    if backend not in SUPPORTED_BACKENDS:
        return (
            f"database URL {shown}: ccm keeps its history in SQLite or PostgreSQL, not {backend}; "
            f"write {_URL_EXAMPLES}"
        )
    if isinstance(exc, ImportError | NoSuchModuleError):
        driver = make_url(url).get_driver_name()
        return (
            f"database URL {shown}: the driver '{driver}' is not installed; "
            "use postgresql+psycopg://... (installed with ccm)"
        )
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(cause).strip()
    first = text.splitlines()[0] if text else type(cause).__name__
    if backend == "postgresql":
        problem = _postgres_problem(text, normalise_url(url))
        if problem:
            return f"cannot use {shown}: {problem}"
    if backend == "sqlite":
        database = make_url(url).database or ""
        if isinstance(cause, OSError) or "unable to open database file" in text:
            return (
                f"cannot open the SQLite file {database}: check that its folder exists and is "
                "writable (or set data_dir / database.url)"
            )
        if "file is not a database" in text:
            return f"{database} is not a SQLite database: point database.url at ccm's file"
        if "database is locked" in text:
            return f"{database} is locked by another process: wait, or stop that process"
    return f"database error on {shown}: {first} (run again with --debug for the traceback)"
