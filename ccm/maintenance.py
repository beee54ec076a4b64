"""Retention by query: delete finished sessions and old closed connections in batches.

Each batch is its own short transaction, so the job is safe while the server runs: live sessions
(pending/running) and open connections never match the predicates.

Rows go in the order they finished: the job walks windows of the end time (`ended_at`,
`disconnected_at`) from the oldest row to the cutoff, each through the index on that time, so a
batch touches neighbouring table pages and no scan starts again from the beginning (on
PostgreSQL it would step over every row already deleted, until a vacuum). A batch deletes by
the database's own row address (SQLite's rowid, PostgreSQL's ctid): no primary-key lookup per
row.

Pacing beside a live server is `ccm.pacing`'s (a batch per transaction, rests between them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Delete,
    Engine,
    Table,
    and_,
    any_,
    delete,
    func,
    literal_column,
    select,
)
from sqlalchemy.sql.elements import ColumnElement

from ccm.domain import FINISHED_STATES
from ccm.pacing import pacer_for
from ccm.store.models import connections, sessions

logger = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
"""Called as `progress(table, rows_deleted_in_this_batch)`."""

_FINISHED = sorted(s.value for s in FINISHED_STATES)


@dataclass(frozen=True, slots=True)
class CleanupPlan:
    sessions: int
    connections: int


@dataclass(frozen=True, slots=True)
class CleanupReport:
    sessions_deleted: int
    connections_deleted: int
    dry_run: bool


def _finished_sessions(
    cutoff: datetime, since: datetime | None = None, states: list[str] = _FINISHED
) -> ColumnElement[bool]:
    """Sessions in a final state that ended before `cutoff` (and at or after `since`)."""
    clause = and_(sessions.c.state.in_(states), sessions.c.ended_at < cutoff)
    return clause if since is None else and_(clause, sessions.c.ended_at >= since)


def _old_connections(cutoff: datetime, since: datetime | None = None) -> ColumnElement[bool]:
    """Connections that closed before `cutoff` (and at or after `since`)."""
    clause = and_(
        connections.c.disconnected_at.is_not(None), connections.c.disconnected_at < cutoff
    )
    return clause if since is None else and_(clause, connections.c.disconnected_at >= since)


@dataclass(frozen=True, slots=True)
class _Target:
    """What one table's cleanup deletes: rows matching `where(cutoff, since)`, walked by `ended`."""

    table: Table
    key: Column[Any]
    ended: Column[Any]
    where: Callable[[datetime, datetime | None], ColumnElement[bool]]
    first: Callable[[datetime, datetime | None], list[ColumnElement[bool]]]
    """Predicates whose smallest `ended` together is the first row to delete; each one is a
    single seek in the index on `ended` (sessions: one per final state)."""


_SESSIONS = _Target(
    sessions,
    sessions.c.id,
    sessions.c.ended_at,
    _finished_sessions,
    lambda cutoff, since: [_finished_sessions(cutoff, since, [state]) for state in _FINISHED],
)
_CONNECTIONS = _Target(
    connections,
    connections.c.connection_id,
    connections.c.disconnected_at,
    _old_connections,
    lambda cutoff, since: [_old_connections(cutoff, since)],
)


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
    ended before `connections_before`, at most `batch_size` rows per transaction.

    `pause`: seconds to rest after each batch. None (default): paced for a live server (see the
    module's docstring); on SQLite the batches are then also sized to hold the write lock only a
    few milliseconds while another connection is writing. With a number, every batch is
    `batch_size` rows and the job rests that long after each."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if dry_run:
        plan = plan_cleanup(
            engine, sessions_before=sessions_before, connections_before=connections_before
        )
        return CleanupReport(plan.sessions, plan.connections, dry_run=True)
    deleted_sessions = _delete_finished(
        engine, _SESSIONS, sessions_before, batch_size, progress, pause
    )
    deleted_connections = 0
    if connections_before is not None:
        deleted_connections = _delete_finished(
            engine, _CONNECTIONS, connections_before, batch_size, progress, pause
        )
    logger.info("cleanup deleted sessions=%d connections=%d", deleted_sessions, deleted_connections)
    return CleanupReport(deleted_sessions, deleted_connections, dry_run=False)


# -- the walk ------------------------------------------------------------------------------------


def _delete_statement(dialect: str, target: _Target, where: ColumnElement[bool], n: int) -> Delete:
    """Delete at most `n` rows matching `where`, addressed by the database's row address."""
    table = target.table
    if dialect == "sqlite":
        rowid: ColumnElement[Any] = literal_column("rowid")
        return delete(table).where(rowid.in_(select(rowid).where(where).limit(n)))
    if dialect == "postgresql":
        # `ctid = ANY(ARRAY(subquery))` is a TID scan: no primary-key lookup per row (`ctid IN
        # (subquery)` would be a join). A ctid names a row version, never a newer one, and the
        # predicate is checked again, so a row changed since the subquery saw it is kept.
        ctid: ColumnElement[Any] = literal_column("ctid")
        rows = select(ctid).where(where).limit(n).scalar_subquery()
        return delete(table).where(ctid == any_(func.array(rows))).where(where)
    return delete(table).where(target.key.in_(select(target.key).where(where).limit(n)))


def _first_ended(
    conn: Connection, target: _Target, cutoff: datetime, since: datetime | None
) -> datetime | None:
    """The smallest end time of a row to delete (at or after `since`), or None."""
    found = [
        conn.execute(select(func.min(target.ended)).where(clause)).scalar_one()
        for clause in target.first(cutoff, since)
    ]
    conn.commit()
    return min((t for t in found if t is not None), default=None)


def _delete_finished(
    engine: Engine,
    target: _Target,
    cutoff: datetime,
    batch_size: int,
    progress: Progress | None,
    pause: float | None,
) -> int:
    """Walk windows [lo, hi) of the end time from the oldest row up to `cutoff`, deleting each
    window's rows in batches. A window is sized to hold about one batch (from the rows the last
    window had); an empty window jumps to the next row's end time, so gaps cost one query."""
    dialect = engine.dialect.name
    total = 0
    with engine.connect() as conn, pacer_for(conn, dialect, batch_size, pause) as pacer:
        lo = _first_ended(conn, target, cutoff, None)
        width = timedelta(minutes=1)
        while lo is not None and lo < cutoff:
            hi = min(lo + width, cutoff)
            in_window = 0
            while True:
                n = pacer.batch()
                statement = _delete_statement(dialect, target, target.where(hi, lo), n)

                def batch(s: Delete = statement) -> int:
                    return conn.execute(s).rowcount

                deleted = pacer.run(batch)
                total += deleted
                in_window += deleted
                if progress is not None and deleted:
                    progress(target.table.name, deleted)
                if deleted < n:
                    break
            if in_window == 0:
                lo = _first_ended(conn, target, cutoff, hi)
                width = timedelta(minutes=1)
            else:
                lo = hi
            # Aim the next window at about one batch; grow at most 4x at a time.
            width = width * min(4.0, max(0.25, pacer.batch() / max(in_window, 1)))
    return total
