"""Audit reports from the SQL history: one session's whole story, and the load of each device.

Used by `ccm audit session` and the dashboard's session panel, so both tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, or_, select

from ccm.domain import SessionState
from ccm.store.models import connections, sessions
from ccm.store.repository import ConnectionRow, SessionRow


@dataclass(frozen=True, slots=True)
class SessionStory:
    """A session run with what surrounded it."""

    session: SessionRow
    other_runs: list[str]
    """ccm ids (`sessions.id`) of the other runs with the same wire id, newest first."""
    device_connection: ConnectionRow | None
    """The device's connection open when the session was created, if any."""
    requester_connection: ConnectionRow | None
    """The constellation's connection open then (None for HTTP and device-origin sessions)."""

    @property
    def duration_seconds(self) -> float | None:
        """From start (or creation) to end; None while it runs."""
        row = self.session
        if row.ended_at is None:
            return None
        return (row.ended_at - (row.started_at or row.created_at)).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        return {
            "session": self.session.as_dict(),
            "duration_seconds": self.duration_seconds,
            "other_runs": self.other_runs,
            "device_connection": _dict(self.device_connection),
            "requester_connection": _dict(self.requester_connection),
        }


def _dict(row: ConnectionRow | None) -> dict[str, Any] | None:
    return row.as_dict() if row is not None else None


def _session_rows(engine: Engine, where: Any) -> list[SessionRow]:
    query = select(*sessions.c).where(where).order_by(sessions.c.created_at.desc())
    with engine.connect() as conn:
        return [
            SessionRow(**{k: v for k, v in row._mapping.items() if k != "server_run_id"})
            for row in conn.execute(query)
        ]


def _connection_at(engine: Engine, client_id: str | None, at: datetime) -> ConnectionRow | None:
    """The client's connection that was open at `at`: the newest that began by then and had not
    ended before it."""
    if client_id is None:
        return None
    query = (
        select(*connections.c)
        .where(
            connections.c.client_id == client_id,
            connections.c.connected_at <= at,
            or_(connections.c.disconnected_at.is_(None), connections.c.disconnected_at >= at),
        )
        .order_by(connections.c.connected_at.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return ConnectionRow(**row._mapping) if row is not None else None


def read_session_story(engine: Engine, ident: str) -> SessionStory | None:
    """The run with ccm id `ident`, or else the newest run whose wire `session_id` is `ident`
    (a constellation may reuse a session id once the earlier run ended); None if neither."""
    by_id = _session_rows(engine, sessions.c.id == ident)
    runs = _session_rows(engine, sessions.c.session_id == (by_id[0].session_id if by_id else ident))
    if not runs:
        return None
    chosen = by_id[0] if by_id else runs[0]
    return SessionStory(
        session=chosen,
        other_runs=[run.id for run in runs if run.id != chosen.id],
        device_connection=_connection_at(engine, chosen.device_id, chosen.created_at),
        requester_connection=_connection_at(engine, chosen.constellation_id, chosen.created_at),
    )


def read_device_loads(engine: Engine) -> dict[str, dict[str, int]]:
    """Running and queued (pending) sessions per device, as recorded in SQL."""
    states = {SessionState.RUNNING.value: "running", SessionState.PENDING.value: "queued"}
    with engine.connect() as conn:
        rows = conn.execute(
            select(sessions.c.device_id, sessions.c.state, func.count())
            .where(sessions.c.state.in_(list(states)))
            .group_by(sessions.c.device_id, sessions.c.state)
        ).all()
    loads: dict[str, dict[str, int]] = {}
    for device_id, state, count in rows:
        loads.setdefault(device_id, {"running": 0, "queued": 0})[states[state]] = count
    return loads
