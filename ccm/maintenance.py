"""Retention by query: delete finished sessions and old closed connections in small batches.

Each batch is its own short transaction, so the job is safe while the server runs: live sessions
(pending/running) and open connections never match the predicates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, delete, func, select

from ccm.store.models import FINISHED_STATES, connections, sessions

logger = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
"""Called as `progress(table, rows_deleted_in_this_batch)`."""

_FINISHED = [s.value for s in FINISHED_STATES]


@dataclass(frozen=True, slots=True)
class CleanupPlan:
    sessions: int
    connections: int


@dataclass(frozen=True, slots=True)
class CleanupReport:
    sessions_deleted: int
    connections_deleted: int
    dry_run: bool


def _finished_sessions(cutoff: datetime):  # type: ignore[no-untyped-def]
    return and_(sessions.c.state.in_(_FINISHED), sessions.c.ended_at < cutoff)


def _old_connections(cutoff: datetime):  # type: ignore[no-untyped-def]
    return and_(connections.c.disconnected_at.is_not(None), connections.c.disconnected_at < cutoff)


def plan_cleanup(
    engine: Engine, *, sessions_before: datetime, connections_before: datetime | None
) -> CleanupPlan:
    """Count what a cleanup would delete (the dry run)."""
    with engine.connect() as conn:
        n_sessions = conn.execute(
            select(func.count()).select_from(sessions).where(_finished_sessions(sessions_before))
        ).scalar_one()
        n_connections = 0
        if connections_before is not None:
            n_connections = conn.execute(
                select(func.count())
                .select_from(connections)
                .where(_old_connections(connections_before))
            ).scalar_one()
    return CleanupPlan(n_sessions, n_connections)


def run_cleanup(
    engine: Engine,
    *,
    sessions_before: datetime,
    connections_before: datetime | None = None,
    batch_size: int = 5000,
    dry_run: bool = False,
    progress: Progress | None = None,
    pause: float | None = None,
) -> CleanupReport:
    """Delete finished sessions that ended before `sessions_before` and closed connections that
    ended before `connections_before`, `batch_size` rows per transaction.

    `pause`: seconds to rest between batches. None (default): on SQLite as long as the batch
    took, on PostgreSQL none. SQLite has one write lock and a waiting writer only polls for it
    (backing off to 100 ms), so a cleanup that takes the lock again right after each commit
    starves a live server's writer: its acknowledgements stall for seconds (measured in
    tests/benchmarks). Resting as long as each batch took halves the deletion rate but lets the
    server commit between batches. PostgreSQL locks rows, so the server's writes never wait."""
    if dry_run:
        plan = plan_cleanup(
            engine, sessions_before=sessions_before, connections_before=connections_before
        )
        return CleanupReport(plan.sessions, plan.connections, dry_run=True)
    deleted_sessions = _delete_in_batches(
        engine, sessions, sessions.c.id, _finished_sessions(sessions_before), batch_size, progress,
        pause,
    )
    deleted_connections = 0
    if connections_before is not None:
        deleted_connections = _delete_in_batches(
            engine,
            connections,
            connections.c.connection_id,
            _old_connections(connections_before),
            batch_size,
            progress,
            pause,
        )
    logger.info(
        "cleanup deleted sessions=%d connections=%d", deleted_sessions, deleted_connections
    )
    return CleanupReport(deleted_sessions, deleted_connections, dry_run=False)


def _delete_in_batches(  # type: ignore[no-untyped-def]
    engine: Engine,
    table,
    key,
    predicate,
    batch_size: int,
    progress: Progress | None,
    pause: float | None = None,
) -> int:
    total = 0
    sqlite = engine.dialect.name == "sqlite"
    while True:
        ids = select(key).where(predicate).limit(batch_size)
        started = time.perf_counter()
        with engine.begin() as conn:
            deleted = conn.execute(delete(table).where(key.in_(ids))).rowcount
        took = time.perf_counter() - started
        total += deleted
        if progress is not None and deleted:
            progress(table.name, deleted)
        if deleted < batch_size:
            return total
        rest = (took if sqlite else 0.0) if pause is None else pause
        if rest > 0:
            time.sleep(rest)
