"""Retention cleanup on real databases: exactly the finished-and-old rows go, in batches."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from ccm.domain import SessionState
from ccm.maintenance import plan_cleanup, run_cleanup
from ccm.store.models import clients, connections, sessions

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SESSIONS_CUTOFF = NOW - timedelta(days=7)
CONNECTIONS_CUTOFF = NOW - timedelta(days=30)
N_SESSIONS = 3000
N_CONNECTIONS = 2400
FINISHED = {
    SessionState.COMPLETED,
    SessionState.FAILED,
    SessionState.CANCELLED,
    SessionState.INTERRUPTED,
}


@dataclass(frozen=True)
class Seeded:
    session_ids: set[str]
    sessions_to_delete: set[str]
    connection_ids: set[str]
    connections_to_delete: set[str]


def _session_row(i: int, state: SessionState, ended_at: datetime | None) -> dict[str, Any]:
    created = (ended_at or NOW) - timedelta(hours=1)
    return {
        "id": f"run-{i:05d}",
        "session_id": f"s-{i}",
        "task_name": "task",
        "request": None,
        "origin": "constellation",
        "constellation_id": "con-1",
        "device_id": f"dev-{i % 7}",
        "mode": "relay",
        "state": state.value,
        "reason": None,
        "result": {"i": i} if state is SessionState.COMPLETED else None,
        "error": None,
        "created_at": created,
        "started_at": created,
        "ended_at": ended_at,
        "server_run_id": None,
    }


def _seed_sessions() -> tuple[list[dict[str, Any]], set[str]]:
    """Every state at four ages (one at the cutoff); some live ones carry an old ended_at."""
    states = list(SessionState)
    ages = [
        SESSIONS_CUTOFF - timedelta(days=30),  # old
        SESSIONS_CUTOFF - timedelta(microseconds=1),  # just old enough
        SESSIONS_CUTOFF,  # exactly at the cutoff: kept (strictly before only)
        NOW - timedelta(hours=2),  # recent
    ]
    rows, doomed = [], set()
    for i in range(N_SESSIONS):
        state = states[i % len(states)]
        age = ages[(i // len(states)) % len(ages)]
        if state in FINISHED:
            ended_at: datetime | None = age
        else:
            # A live session has no end; a few carry an old one anyway and must still survive.
            ended_at = age if i % 5 == 0 else None
        row = _session_row(i, state, ended_at)
        rows.append(row)
        if state in FINISHED and ended_at is not None and ended_at < SESSIONS_CUTOFF:
            doomed.add(row["id"])
    return rows, doomed


_DEVICE_IDS = {f"dev-{i}" for i in range(7)}


def _seed_connections() -> tuple[list[dict[str, Any]], set[str]]:
    """Closed old, closed recent, closed at the cutoff, and open old connections."""
    kinds = ["closed_old", "closed_recent", "closed_at_cutoff", "open_old"]
    rows, doomed = [], set()
    for i in range(N_CONNECTIONS):
        kind = kinds[i % len(kinds)]
        connected = NOW - timedelta(days=90)
        disconnected = {
            "closed_old": CONNECTIONS_CUTOFF - timedelta(days=1),
            "closed_recent": NOW - timedelta(days=1),
            "closed_at_cutoff": CONNECTIONS_CUTOFF,
            "open_old": None,
        }[kind]
        row = {
            "connection_id": f"conn-{i:05d}",
            # At most one open connection per client id (the schema's rule): open ones get
            # an id of their own.
            "client_id": f"dev-{i % 7}" if disconnected is not None else f"dev-open-{i}",
            "client_type": "device",
            "connected_at": connected,
            "disconnected_at": disconnected,
            "disconnect_reason": None if disconnected is None else "closed",
            "remote_address": "10.0.0.1:1",
            "server_run_id": None,
        }
        rows.append(row)
        if kind == "closed_old":
            doomed.add(row["connection_id"])
    return rows, doomed


@pytest.fixture
def seeded(engine: Engine) -> Seeded:
    session_rows, doomed_sessions = _seed_sessions()
    connection_rows, doomed_connections = _seed_connections()
    client_rows = [
        {
            "client_id": client_id,
            "client_type": "device",
            "first_seen_at": NOW - timedelta(days=100),
            "last_seen_at": NOW,
            "online": False,
        }
        for client_id in sorted({row["client_id"] for row in connection_rows} | _DEVICE_IDS)
    ]
    with engine.begin() as conn:
        conn.execute(insert(clients), client_rows)
        conn.execute(insert(sessions), session_rows)
        conn.execute(insert(connections), connection_rows)
    # The seed must exercise every case, or a passing cleanup would prove little.
    assert 0 < len(doomed_sessions) < N_SESSIONS
    assert 0 < len(doomed_connections) < N_CONNECTIONS
    return Seeded(
        session_ids={r["id"] for r in session_rows},
        sessions_to_delete=doomed_sessions,
        connection_ids={r["connection_id"] for r in connection_rows},
        connections_to_delete=doomed_connections,
    )


def _ids(engine: Engine, column: Any) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(column)).scalars())


def test_cleanup_deletes_exactly_finished_old_sessions(engine: Engine, seeded: Seeded) -> None:
    """Only sessions in a final state that ended before the cutoff are gone; all others remain."""
    report = run_cleanup(
        engine,
        sessions_before=SESSIONS_CUTOFF,
        connections_before=CONNECTIONS_CUTOFF,
        batch_size=500,
    )

    assert report.sessions_deleted == len(seeded.sessions_to_delete)
    assert _ids(engine, sessions.c.id) == seeded.session_ids - seeded.sessions_to_delete


def test_cleanup_never_deletes_live_sessions(engine: Engine, seeded: Seeded) -> None:
    """Every pending and running session survives, even one with a stray old ended_at."""
    run_cleanup(engine, sessions_before=NOW + timedelta(days=365), batch_size=500)

    with engine.connect() as conn:
        remaining = list(conn.execute(select(sessions.c.state)).scalars())
    assert set(remaining) == {"pending", "running"}
    assert len(remaining) == N_SESSIONS // 3  # all 1,000 live sessions of the seed


def test_cleanup_deletes_exactly_old_closed_connections(engine: Engine, seeded: Seeded) -> None:
    """Only connections closed before the cutoff are gone; open and recent ones remain."""
    report = run_cleanup(
        engine,
        sessions_before=SESSIONS_CUTOFF,
        connections_before=CONNECTIONS_CUTOFF,
        batch_size=500,
    )

    assert report.connections_deleted == len(seeded.connections_to_delete)
    remaining = _ids(engine, connections.c.connection_id)
    assert remaining == seeded.connection_ids - seeded.connections_to_delete


def test_cleanup_without_connection_cutoff_keeps_connections(
    engine: Engine, seeded: Seeded
) -> None:
    """connections_before=None deletes no connection rows."""
    report = run_cleanup(engine, sessions_before=SESSIONS_CUTOFF, batch_size=500)

    assert report.connections_deleted == 0
    assert _ids(engine, connections.c.connection_id) == seeded.connection_ids


def test_dry_run_counts_without_deleting(engine: Engine, seeded: Seeded) -> None:
    """A dry run reports the same numbers a real run deletes, and deletes nothing."""
    report = run_cleanup(
        engine,
        sessions_before=SESSIONS_CUTOFF,
        connections_before=CONNECTIONS_CUTOFF,
        batch_size=500,
        dry_run=True,
    )

    assert report.dry_run is True
    assert (report.sessions_deleted, report.connections_deleted) == (
        len(seeded.sessions_to_delete),
        len(seeded.connections_to_delete),
    )
    assert _ids(engine, sessions.c.id) == seeded.session_ids
    assert _ids(engine, connections.c.connection_id) == seeded.connection_ids


def test_plan_matches_what_cleanup_deletes(engine: Engine, seeded: Seeded) -> None:
    """plan_cleanup's counts equal the rows the following cleanup deletes."""
    plan = plan_cleanup(
        engine, sessions_before=SESSIONS_CUTOFF, connections_before=CONNECTIONS_CUTOFF
    )
    report = run_cleanup(
        engine,
        sessions_before=SESSIONS_CUTOFF,
        connections_before=CONNECTIONS_CUTOFF,
        batch_size=500,
    )

    assert (plan.sessions, plan.connections) == (
        report.sessions_deleted,
        report.connections_deleted,
    )


def test_progress_totals_equal_deleted_counts(engine: Engine, seeded: Seeded) -> None:
    """Progress is reported per batch (at most batch_size each) and sums to the deleted counts."""
    calls: list[tuple[str, int]] = []
    report = run_cleanup(
        engine,
        sessions_before=SESSIONS_CUTOFF,
        connections_before=CONNECTIONS_CUTOFF,
        batch_size=500,
        progress=lambda table, n: calls.append((table, n)),
    )

    totals = {"sessions": 0, "connections": 0}
    for table, n in calls:
        totals[table] += n
    assert totals == {
        "sessions": report.sessions_deleted,
        "connections": report.connections_deleted,
    }
    assert all(0 < n <= 500 for _, n in calls)
    assert len([t for t, _ in calls if t == "sessions"]) > 1  # really batched


def test_second_cleanup_deletes_nothing(engine: Engine, seeded: Seeded) -> None:
    """Cleanup is a query, so running it again finds nothing more to delete."""
    kwargs: dict[str, Any] = {
        "sessions_before": SESSIONS_CUTOFF,
        "connections_before": CONNECTIONS_CUTOFF,
        "batch_size": 500,
    }
    run_cleanup(engine, **kwargs)
    again = run_cleanup(engine, **kwargs)

    assert (again.sessions_deleted, again.connections_deleted) == (0, 0)


# -- how the batches run -------------------------------------------------------------------------


def _finished_rows(n: int, ended_at: Any, *, start: int = 0) -> list[dict[str, Any]]:
    return [_session_row(start + i, SessionState.COMPLETED, ended_at(i)) for i in range(n)]


def test_rows_ending_at_the_same_instant_beyond_a_batch_all_go(engine: Engine) -> None:
    """Many more rows than a batch with one end time, and rows scattered over years with long
    gaps between them: every one before the cutoff is deleted, none after it."""
    same = SESSIONS_CUTOFF - timedelta(days=3)
    rows = _finished_rows(1300, lambda i: same)
    rows += _finished_rows(
        40,
        lambda i: SESSIONS_CUTOFF - timedelta(days=400 * (i % 4) + i, seconds=i + 1),
        start=2000,
    )
    rows += _finished_rows(20, lambda i: SESSIONS_CUTOFF + timedelta(seconds=i), start=3000)
    with engine.begin() as conn:
        conn.execute(insert(sessions), rows)

    report = run_cleanup(engine, sessions_before=SESSIONS_CUTOFF, batch_size=500)

    assert report.sessions_deleted == 1340
    assert _ids(engine, sessions.c.id) == {f"run-{3000 + i:05d}" for i in range(20)}


def test_a_fixed_pause_runs_full_batches(engine: Engine, seeded: Seeded) -> None:
    """With `pause` given, every batch but the last of a window is `batch_size` rows."""
    sizes: list[int] = []
    report = run_cleanup(
        engine,
        sessions_before=NOW + timedelta(days=365),
        batch_size=100,
        pause=0.0,
        progress=lambda table, n: sizes.append(n),
    )

    assert sum(sizes) == report.sessions_deleted == len(FINISHED) * N_SESSIONS // 6
    assert max(sizes) == 100
    assert sizes.count(100) >= report.sessions_deleted // 100 - 4  # one short batch per window


def test_batch_size_must_be_positive(engine: Engine) -> None:
    """A batch_size of 0 is refused with a ValueError naming it."""
    with pytest.raises(ValueError, match="batch_size"):
        run_cleanup(engine, sessions_before=SESSIONS_CUTOFF, batch_size=0)


@pytest.fixture
def sqlite_engine(engine: Engine) -> Engine:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's write lock and pragmas")
    return engine


def _pragmas(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: int(conn.exec_driver_sql(f"PRAGMA {name}").scalar_one())
            for name in ("cache_size", "wal_autocheckpoint")
        }


def test_sqlite_connection_settings_are_put_back(sqlite_engine: Engine, seeded: Seeded) -> None:
    """The cleanup turns SQLite's automatic WAL checkpoint off for its own connection, and on
    again before that connection goes back to the pool; nothing else is changed."""
    before = _pragmas(sqlite_engine)
    run_cleanup(sqlite_engine, sessions_before=SESSIONS_CUTOFF, batch_size=500)

    assert _pragmas(sqlite_engine) == before == {"cache_size": -65536, "wal_autocheckpoint": 1000}


def test_sqlite_batches_grow_while_nobody_else_writes(sqlite_engine: Engine) -> None:
    """Alone on the database, the cleanup soon runs batches of `batch_size`."""
    with sqlite_engine.begin() as conn:
        conn.execute(
            insert(sessions),
            _finished_rows(4000, lambda i: SESSIONS_CUTOFF - timedelta(days=1, seconds=i)),
        )
    sizes: list[int] = []
    run_cleanup(
        sqlite_engine,
        sessions_before=SESSIONS_CUTOFF,
        batch_size=400,
        progress=lambda table, n: sizes.append(n),
    )

    assert sum(sizes) == 4000
    assert sizes.count(400) >= 3


def test_sqlite_batches_stay_short_while_another_connection_writes(
    sqlite_engine: Engine, database_url: str
) -> None:
    """While another connection keeps committing, each batch holds the write lock only a few
    milliseconds: batches stay far below `batch_size`, and the other writer's commits go on
    throughout (none waits anywhere near as long as one full batch takes)."""
    import threading
    import time

    from ccm.store.engine import make_engine

    with sqlite_engine.begin() as conn:
        conn.execute(
            insert(sessions),
            _finished_rows(3000, lambda i: SESSIONS_CUTOFF - timedelta(days=1, seconds=i)),
        )
        conn.execute(
            insert(clients),
            [
                {
                    "client_id": "writer",
                    "client_type": "device",
                    "first_seen_at": NOW,
                    "last_seen_at": NOW,
                    "online": True,
                }
            ],
        )
    other = make_engine(database_url)
    stop = threading.Event()
    waits: list[float] = []

    def write() -> None:
        tick = 0
        while not stop.is_set():
            tick += 1  # a new value each time: SQLite commits nothing for an unchanged row
            started = time.perf_counter()
            with other.begin() as conn:
                conn.execute(clients.update().values(last_seen_at=NOW + timedelta(seconds=tick)))
            waits.append(time.perf_counter() - started)
            time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()
    sizes: list[int] = []
    try:
        time.sleep(0.05)
        run_cleanup(
            sqlite_engine,
            sessions_before=SESSIONS_CUTOFF,
            batch_size=3000,
            progress=lambda table, n: sizes.append(n),
        )
    finally:
        stop.set()
        writer.join()
        other.dispose()

    assert sum(sizes) == 3000
    assert max(sizes) < 1000
    assert len(waits) > 50
    assert sorted(waits)[len(waits) // 2] < 0.05  # the median commit did not wait on cleanup
