"""The nodes of a cluster (PostgreSQL): leases on `server_runs`, reaping a dead node once,
restart recovery of what gone nodes left open, and the nodes list. Every time here is the
database's clock (`now()`).

A node is one run of the server (`server_runs.run_id`). Its lease is `lease_until`; a node that
cannot renew it before it runs out is dead to the others. Reaping takes a cluster-wide advisory
lock and moves the run from `alive` to `dead` in the same transaction as it closes what the run
held, so it happens once, whoever tries.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, or_, select, text, update

from ccm.domain import LIVE_STATES, DisconnectReason, SessionReason, SessionState
from ccm.store.models import clients, connections, inbox, server_runs, sessions

REAPER_LOCK = 0x63636D01
"""pg_advisory_xact_lock key taken by whoever reaps a dead node ('ccm' 1)."""

ALIVE, LEFT, DEAD = "alive", "left", "dead"

_LIVE = [s.value for s in LIVE_STATES]


class GoneBy(StrEnum):
    """How a node left without a word, which decides the reasons its rows close with."""

    LEASE_EXPIRED = "lease_expired"
    """Declared dead by the cluster: connections `node_lost`, sessions failed `node_lost`."""
    RESTARTED = "server_restart"
    """Its own successor found it gone (same host and address, process not running): rows
    close as on a single node's restart, connections and sessions `server_restart`."""


def _lease_end(seconds: float) -> Any:
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, seconds)


@dataclass(frozen=True, slots=True)
class EndedRemotely:
    """A session a reaper ended for a dead node: what its other parties need to be told."""

    session_id: str
    constellation_id: str | None
    device_id: str
    state: SessionState


@dataclass(frozen=True, slots=True)
class ReapReport:
    run_id: str
    connections_closed: int
    sessions: list[EndedRemotely]


@dataclass(frozen=True, slots=True)
class NodeRow:
    run_id: str
    name: str | None
    address: str | None
    hostname: str | None
    pid: int | None
    version: str | None
    state: str
    started_at: datetime
    renewed_at: datetime | None
    lease_until: datetime | None
    clients: int
    running_sessions: int

    def as_dict(self) -> dict[str, Any]:
        return {
            name: (value.isoformat() if isinstance(value, datetime) else value)
            for name, value in ((n, getattr(self, n)) for n in self.__slots__)
        }


def join(
    engine: Engine, *, run_id: str, name: str, address: str, version: str, lease: float
) -> None:
    """Register this node: a run row, alive, with a lease from the database's clock."""
    with engine.begin() as conn:
        conn.execute(
            server_runs.insert().values(
                run_id=run_id,
                started_at=func.now(),
                hostname=socket.gethostname(),
                version=version,
                name=name,
                address=address,
                pid=os.getpid(),
                state=ALIVE,
                renewed_at=func.now(),
                lease_until=_lease_end(lease),
            )
        )


def renew(engine: Engine, run_id: str, lease: float) -> int | None:
    """Extend the lease and count the other nodes alive now. None if the node was declared
    dead: it must then stop serving (it is fenced). A lease that ran out while nobody reaped the
    node (the database was away for every node, or the node was alone) is extended: the row
    lock orders this against a reaper's update, so either the renewal or the reap wins, never
    both."""
    with engine.begin() as conn:
        renewed = conn.execute(
            update(server_runs)
            .where(server_runs.c.run_id == run_id, server_runs.c.state == ALIVE)
            .values(renewed_at=func.now(), lease_until=_lease_end(lease))
            .returning(server_runs.c.run_id)
        ).first()
        if renewed is None:
            return None
        return len([other for other in alive_nodes(conn) if other != run_id])


def leave(engine: Engine, run_id: str) -> None:
    """A clean stop: the node leaves the cluster table at once (no lease to wait out)."""
    with engine.begin() as conn:
        conn.execute(
            update(server_runs)
            .where(server_runs.c.run_id == run_id, server_runs.c.state == ALIVE)
            .values(state=LEFT, stopped_at=func.now(), lease_until=None, ended_reason="stopped")
        )


def alive_nodes(conn: Connection) -> list[str]:
    """Runs whose lease is running now."""
    rows = conn.execute(
        select(server_runs.c.run_id).where(
            server_runs.c.state == ALIVE, server_runs.c.lease_until > func.now()
        )
    )
    return [row[0] for row in rows]


def expired_nodes(engine: Engine, *, me: str) -> list[str]:
    """Runs still marked alive whose lease has run out (or that never had one: runs of a
    version before leases, which never recorded their stop)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(server_runs.c.run_id).where(
                server_runs.c.state == ALIVE,
                server_runs.c.run_id != me,
                or_(server_runs.c.lease_until.is_(None), server_runs.c.lease_until < func.now()),
            )
        )
        return [row[0] for row in rows]


def reap(
    conn: Connection, run_id: str, *, gone_by: GoneBy = GoneBy.LEASE_EXPIRED
) -> ReapReport | None:
    """In the caller's transaction: declare `run_id` dead and close what it held, once.

    None if another node holds the reaper's lock (it will do it) or the run is not an expired
    alive run any more (already reaped, or it renewed in time). Its open connections close as
    `node_lost`, its clients go offline, and its live sessions (executed by its devices) fail
    as `node_lost`; the report lists them so the caller can tell their other parties."""
    locked = conn.execute(select(func.pg_try_advisory_xact_lock(REAPER_LOCK))).scalar()
    if not locked:
        return None
    still_held = [server_runs.c.run_id == run_id, server_runs.c.state == ALIVE]
    if gone_by is GoneBy.LEASE_EXPIRED:
        still_held.append(
            or_(server_runs.c.lease_until.is_(None), server_runs.c.lease_until < func.now())
        )
    dead = conn.execute(
        update(server_runs)
        .where(*still_held)
        .values(state=DEAD, stopped_at=func.now(), ended_reason=gone_by.value)
        .returning(server_runs.c.run_id)
    ).first()
    if dead is None:
        return None
    return close_holdings(conn, run_id, gone_by=gone_by)


def close_holdings(
    conn: Connection, run_id: str, *, gone_by: GoneBy = GoneBy.LEASE_EXPIRED
) -> ReapReport:
    """Close the open connections and live sessions of a run that is gone (reaped, or left
    without closing them), in the caller's transaction."""
    restarted = gone_by is GoneBy.RESTARTED
    disconnect = DisconnectReason.SERVER_RESTART if restarted else DisconnectReason.NODE_LOST
    state = SessionState.INTERRUPTED if restarted else SessionState.FAILED
    reason = SessionReason.SERVER_RESTART if restarted else SessionReason.NODE_LOST
    closed = conn.execute(
        update(connections)
        .where(connections.c.server_run_id == run_id, connections.c.disconnected_at.is_(None))
        .values(disconnected_at=func.now(), disconnect_reason=disconnect.value)
        .returning(connections.c.connection_id)
    ).all()
    if closed:
        conn.execute(
            update(clients)
            .where(clients.c.current_connection_id.in_([row[0] for row in closed]))
            .values(online=False, current_connection_id=None, last_seen_at=func.now())
        )
    ended = conn.execute(
        update(sessions)
        .where(sessions.c.server_run_id == run_id, sessions.c.state.in_(_LIVE))
        .values(
            state=state.value,
            reason=reason.value,
            error=None if restarted else NODE_LOST_ERROR,
            ended_at=func.now(),
        )
        .returning(sessions.c.session_id, sessions.c.constellation_id, sessions.c.device_id)
    ).all()
    conn.execute(delete(inbox).where(inbox.c.target_run_id == run_id))  # nobody reads it now
    return ReapReport(
        run_id=run_id,
        connections_closed=len(closed),
        sessions=[EndedRemotely(s, c, d, state) for s, c, d in ended],
    )


NODE_LOST_ERROR = "the node that ran this session was lost (its lease expired)"


def previous_incarnations(engine: Engine, *, me: str, address: str) -> list[str]:
    """Runs of this node that died without a word and that it need not wait a lease for: rows
    still alive on this host, at this node's address, whose process is not running. Both the
    address and the process are checked: containers that share a host name but not a process
    table (host networking) cannot share an address, since one port is bound by one process."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(server_runs.c.run_id, server_runs.c.pid).where(
                server_runs.c.state == ALIVE,
                server_runs.c.run_id != me,
                server_runs.c.hostname == socket.gethostname(),
                server_runs.c.address == address,
            )
        ).all()
    return [
        run_id
        for run_id, pid in rows
        if pid is not None and pid != os.getpid() and not _process_exists(pid)
    ]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to judge
    return True


def orphaned_nodes(engine: Engine) -> list[str]:
    """Runs that are not alive but still hold open connections or live sessions (a stop that
    could not flush, or rows of an older version): restart recovery closes them."""
    with engine.connect() as conn:
        not_alive = select(server_runs.c.run_id).where(server_runs.c.state != ALIVE)
        open_rows = select(connections.c.server_run_id).where(
            connections.c.disconnected_at.is_(None), connections.c.server_run_id.in_(not_alive)
        )
        live_rows = select(sessions.c.server_run_id).where(
            sessions.c.state.in_(_LIVE), sessions.c.server_run_id.in_(not_alive)
        )
        rows = conn.execute(open_rows.union(live_rows))
        return [row[0] for row in rows if row[0] is not None]


def list_nodes(engine: Engine) -> list[NodeRow]:
    """Every node alive or seen in the last day, newest first, with what it holds now."""
    open_counts = (
        select(connections.c.server_run_id, func.count().label("n"))
        .where(connections.c.disconnected_at.is_(None))
        .group_by(connections.c.server_run_id)
        .subquery()
    )
    live_counts = (
        select(sessions.c.server_run_id, func.count().label("n"))
        .where(sessions.c.state.in_(_LIVE))
        .group_by(sessions.c.server_run_id)
        .subquery()
    )
    query = (
        select(
            server_runs.c.run_id,
            server_runs.c.name,
            server_runs.c.address,
            server_runs.c.hostname,
            server_runs.c.pid,
            server_runs.c.version,
            server_runs.c.state,
            server_runs.c.started_at,
            server_runs.c.renewed_at,
            server_runs.c.lease_until,
            func.coalesce(open_counts.c.n, 0).label("clients"),
            func.coalesce(live_counts.c.n, 0).label("running_sessions"),
        )
        .select_from(
            server_runs.outerjoin(
                open_counts, open_counts.c.server_run_id == server_runs.c.run_id
            ).outerjoin(live_counts, live_counts.c.server_run_id == server_runs.c.run_id)
        )
        .where(
            or_(
                server_runs.c.state == ALIVE,
                server_runs.c.stopped_at > func.now() - text("interval '1 day'"),
            )
        )
        .order_by(server_runs.c.started_at.desc())
        .limit(200)
    )
    with engine.connect() as conn:
        return [NodeRow(**row._mapping) for row in conn.execute(query)]
