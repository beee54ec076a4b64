"""Bulk history for (5): N finished sessions and N closed connections, inserted fast.

Rows are generated in time order over `days` days for `devices` devices (and as many
constellations), the shape the audit queries look at. The rows are built by the database itself
(INSERT ... SELECT over a generated series), so no Python runs per row.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from ccm.store.models import connections as connections_table
from ccm.store.models import sessions as sessions_table

SESSION_COLUMNS = (
    "id",
    "session_id",
    "task_name",
    "request",
    "origin",
    "constellation_id",
    "device_id",
    "mode",
    "state",
    "reason",
    "result",
    "error",
    "created_at",
    "started_at",
    "ended_at",
    "server_run_id",
)
CONNECTION_COLUMNS = (
    "connection_id",
    "client_id",
    "client_type",
    "connected_at",
    "disconnected_at",
    "disconnect_reason",
    "remote_address",
    "server_run_id",
)
STATES = ("completed", "completed", "completed", "failed", "cancelled")
RUN_ID = "00000000-0000-4000-8000-000000000001"


def history_start(now: datetime, days: int) -> datetime:
    """The rows span [start, start + days); all end more than a week before `now`."""
    return (now - timedelta(days=days + 8)).replace(hour=0, minute=0, second=0, microsecond=0)


def fill(
    engine: Engine,
    *,
    sessions: int,
    connections: int,
    devices: int = 1000,
    days: int = 30,
    now: datetime | None = None,
    chunk: int = 100_000,
) -> dict[str, float]:
    """Insert the history with INSERT ... SELECT over a generated series: the rows are built by
    the database itself (no Python per row), in chunks, in one transaction. Returns seconds and
    rows/s per table."""
    now = now or datetime.now(UTC)
    start = history_start(now, days)
    epoch = start.timestamp()
    pg = engine.dialect.name == "postgresql"
    timings: dict[str, float] = {}
    # Bulk-load practice: drop the secondary indexes, insert, build them again (a sort per
    # index instead of a random b-tree insert per row and index).
    indexes = [ix for table in (sessions_table, connections_table) for ix in table.indexes]
    with engine.begin() as conn:
        for ix in indexes:
            ix.drop(conn)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cache_size = None
        if pg:
            cur.execute("SET maintenance_work_mem = '256MB'")
        else:
            # The primary keys are scattered (like uuid4): keep their index in memory.
            cache_size = cur.execute("PRAGMA cache_size").fetchone()[0]
            cur.execute("PRAGMA cache_size = -262144")
        clients_sql, sessions_sql, connections_sql = _pg_sql() if pg else _sqlite_sql()
        cur.execute(
            clients_sql,
            {"lo": 0, "hi": devices, "t0": epoch, "step": 0.0, "dev": devices}
            if pg
            else (0, devices, 0.0, epoch),
        )
        for table, total, sql in (
            ("sessions", sessions, sessions_sql),
            ("connections", connections, connections_sql),
        ):
            t0 = time.perf_counter()
            step = days * 86400 / max(total, 1)
            for lo in range(0, total, chunk):
                hi = min(total, lo + chunk)
                if pg:
                    cur.execute(
                        sql, {"lo": lo, "hi": hi, "t0": epoch, "step": step, "dev": devices}
                    )
                else:
                    cur.execute(sql, (lo, hi, step, epoch, devices))
            timings[f"{table}_s"] = time.perf_counter() - t0
            timings[f"{table}_rows_per_s"] = total / timings[f"{table}_s"] if total else 0.0
        raw.commit()
        if cache_size is not None:
            cur.execute(f"PRAGMA cache_size = {int(cache_size)}")  # for the pool's next user
    finally:
        raw.close()
    t1 = time.perf_counter()
    with engine.begin() as conn:
        for ix in indexes:
            ix.create(conn)
    timings["index_build_s"] = time.perf_counter() - t1
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        t2 = time.perf_counter()
        for statement in ("ANALYZE sessions", "ANALYZE connections") if pg else ("ANALYZE",):
            cur.execute(statement)
        raw.commit()
        timings["analyze_s"] = time.perf_counter() - t2
        # Write the loaded pages out now: the load's WAL (over a gigabyte) would otherwise
        # trigger a checkpoint a little later, in the middle of whatever is measured next.
        t3 = time.perf_counter()
        cur.execute("CHECKPOINT" if pg else "PRAGMA wal_checkpoint(TRUNCATE)")
        raw.commit()
        timings["checkpoint_s"] = time.perf_counter() - t3
        cur.close()
    finally:
        raw.close()
    return timings


# Each statement inserts rows lo..hi-1 of a table. Session i: device i % dev, created at
# t0 + i * step, ended 3 s later; one in five failed/cancelled. Connection i: 30 min long.
_SQLITE_SERIES = (
    "WITH RECURSIVE s(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM s WHERE x + 1 < ?2) "
)
_SQLITE_TIME = "strftime('%Y-%m-%d %H:%M:%S', ?4 + x * ?3 {}, 'unixepoch') || '.000000'"
# Ids are uuid4 in ccm, so consecutive rows are far apart in the primary-key index: the first
# 8 hex digits are x times an odd constant mod 2**32 (a permutation, so no two rows collide),
# which spreads them like random ids; the last 12 digits keep x, so every id stays unique.
_SCATTER = 2654435761
_SQLITE_SCATTER = f"(x * {_SCATTER}) % 4294967296"
_PG_SCATTER = f"lpad(to_hex((x::bigint * {_SCATTER}) %% 4294967296), 8, '0')"


def _sqlite_sql() -> tuple[str, str, str]:
    created, ended = _SQLITE_TIME.format(""), _SQLITE_TIME.format("+ 3")
    connected, closed = _SQLITE_TIME.format(""), _SQLITE_TIME.format("+ 1800")
    state = "CASE x % 5 WHEN 3 THEN 'failed' WHEN 4 THEN 'cancelled' ELSE 'completed' END"
    clients = (
        _SQLITE_SERIES + "INSERT INTO clients (client_id, client_type, platform, first_seen_at, "
        "last_seen_at, online) SELECT printf('hist-dev-%04d', x), 'device', 'windows', "
        + _SQLITE_TIME.format("")
        + ", "
        + _SQLITE_TIME.format("")
        + ", 0 FROM s"
    )
    sessions = (
        _SQLITE_SERIES + "INSERT INTO sessions (" + ", ".join(SESSION_COLUMNS) + ") SELECT "
        f"printf('%08x-0000-4000-8000-%012x', {_SQLITE_SCATTER}, x), "
        "printf('hist-con-%04d@t%d', x % ?5, x), "
        "printf('galaxy_hist_t%d', x), 'Open the report and export it.', 'constellation', "
        "printf('hist-con-%04d@hist-dev-%04d', x % ?5, x % ?5), printf('hist-dev-%04d', x % ?5), "
        f"'relay', {state}, CASE WHEN x % 5 < 3 THEN NULL ELSE 'task_failed' END, "
        """CASE WHEN x % 5 < 3 THEN '{"status": "ok"}' END, """
        "CASE WHEN x % 5 < 3 THEN NULL ELSE 'it failed' END, "
        f"{created}, {created}, {ended}, '{RUN_ID}' FROM s"
    )
    connections = (
        _SQLITE_SERIES + "INSERT INTO connections (" + ", ".join(CONNECTION_COLUMNS) + ") SELECT "
        f"printf('%08x-0000-4000-8000-%012x', {_SQLITE_SCATTER}, x), "
        "printf('hist-dev-%04d', x % ?5), 'device', "
        f"{connected}, {closed}, 'closed', '10.0.0.1:5000', '{RUN_ID}' FROM s"
    )
    return clients, sessions, connections


def _pg_sql() -> tuple[str, str, str]:
    t = "to_timestamp(%(t0)s + x * %(step)s{})"
    series = "FROM generate_series(%(lo)s, %(hi)s - 1) AS x"
    hexid = "lpad(to_hex(x), {}, '0')"
    state = "CASE x %% 5 WHEN 3 THEN 'failed' WHEN 4 THEN 'cancelled' ELSE 'completed' END"
    dev = "'hist-dev-' || lpad((x %% %(dev)s)::text, 4, '0')"
    con = "'hist-con-' || lpad((x %% %(dev)s)::text, 4, '0')"
    clients = (
        "INSERT INTO clients (client_id, client_type, platform, first_seen_at, last_seen_at, "
        "online) SELECT 'hist-dev-' || lpad(x::text, 4, '0'), 'device', 'windows', "
        f"{t.format('')}, {t.format('')}, false {series}"
    )
    sessions = (
        "INSERT INTO sessions (" + ", ".join(SESSION_COLUMNS) + ") SELECT "
        f"{_PG_SCATTER} || '-0000-4000-8000-' || {hexid.format(12)}, {con} || '@t' || x, "
        f"'galaxy_hist_t' || x, 'Open the report and export it.', 'constellation', "
        f"{con} || '@' || {dev}, {dev}, 'relay', {state}, "
        "CASE WHEN x %% 5 < 3 THEN NULL ELSE 'task_failed' END, "
        """CASE WHEN x %% 5 < 3 THEN '{"status": "ok"}'::jsonb END, """
        "CASE WHEN x %% 5 < 3 THEN NULL ELSE 'it failed' END, "
        f"{t.format('')}, {t.format('')}, {t.format(' + 3')}, '{RUN_ID}' {series}"
    )
    connections = (
        "INSERT INTO connections (" + ", ".join(CONNECTION_COLUMNS) + ") SELECT "
        f"{_PG_SCATTER} || '-0000-4000-8000-' || {hexid.format(12)}, {dev}, "
        f"'device', {t.format('')}, {t.format(' + 1800')}, 'closed', '10.0.0.1:5000', "
        f"'{RUN_ID}' {series}"
    )
    return clients, sessions, connections
