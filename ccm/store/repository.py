"""Store: the only code that writes SQL. Write methods queue idempotent writes on the writer;
read methods run a query and return plain values (no live ORM objects).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from ccm.clock import utcnow
from ccm.domain import (
    LIVE_STATES,
    ClientType,
    DisconnectReason,
    Mode,
    Origin,
    SessionReason,
    SessionState,
)
from ccm.store.models import (
    clients,
    connections,
    server_runs,
    sessions,
)
from ccm.store.writer import StoreWriter
from ccm.store.writes import (
    BanParams,
    ConnectParams,
    DisconnectParams,
    LastSeenParams,
    RunStoppedParams,
    SessionCreatedParams,
    SessionEndedParams,
    SessionStartedParams,
    SystemInfoParams,
    Write,
    WriteKind,
)


def json_safe(value: Any) -> Any:
    """Metadata goes to a JSON column; anything not JSON-native is stored as its string form."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return str(value)


def _row_dict(row: Any) -> dict[str, Any]:
    """A row as JSON-ready data: times as ISO 8601 strings."""
    return {
        name: (value.isoformat() if isinstance(value, datetime) else value)
        for name, value in ((f, getattr(row, f)) for f in row.__slots__)
    }


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    connections_closed: int
    clients_marked_offline: int
    sessions_interrupted: int


@dataclass(frozen=True, slots=True)
class SessionRow:
    id: str
    session_id: str
    task_name: str | None
    request: str | None
    origin: str
    constellation_id: str | None
    device_id: str
    mode: str
    state: str
    reason: str | None
    result: Any
    error: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return _row_dict(self)


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    connection_id: str
    client_id: str
    client_type: str
    connected_at: datetime
    disconnected_at: datetime | None
    disconnect_reason: str | None
    remote_address: str | None
    server_run_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return _row_dict(self)


@dataclass(frozen=True, slots=True)
class ClientRow:
    client_id: str
    client_type: str
    platform: str | None
    first_seen_at: datetime
    last_seen_at: datetime
    online: bool

    def as_dict(self) -> dict[str, Any]:
        return _row_dict(self)


class Store:
    """Durable history of clients, connections and sessions, written through one StoreWriter."""

    def __init__(self, engine: Engine, writer: StoreWriter, *, run_id: str | None = None) -> None:
        self.engine = engine
        self.writer = writer
        self.run_id = run_id or str(uuid.uuid4())

    # -- lifecycle (synchronous, at start and stop) -----------------------------------------

    def recover_after_restart(self, *, at: datetime | None = None) -> RecoveryReport:
        """Single node (SQLite, which one server holds at a time): close what a previous process
        left open, connections, online flags, live sessions. A cluster node recovers only what
        nodes with an expired lease left (ccm.cluster.lease)."""
        at = at or utcnow()
        with self.engine.begin() as conn:
            closed = conn.execute(
                update(connections)
                .where(connections.c.disconnected_at.is_(None))
                .values(disconnected_at=at, disconnect_reason=DisconnectReason.SERVER_RESTART.value)
            ).rowcount
            offline = conn.execute(
                update(clients)
                .where(clients.c.online.is_(True))
                .values(online=False, current_connection_id=None)
            ).rowcount
            interrupted = conn.execute(
                update(sessions)
                .where(sessions.c.state.in_([s.value for s in LIVE_STATES]))
                .values(
                    state=SessionState.INTERRUPTED.value,
                    reason=SessionReason.SERVER_RESTART.value,
                    ended_at=at,
                )
            ).rowcount
            conn.execute(
                update(server_runs)
                .where(server_runs.c.stopped_at.is_(None))
                .values(stopped_at=at, state="dead", ended_reason="server_restart")
            )
        return RecoveryReport(closed, offline, interrupted)

    def record_run_started(
        self, *, version: str, name: str | None = None, address: str | None = None
    ) -> None:
        """Single node: this run's row (a cluster node joins through ccm.store.nodes)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(server_runs).values(
                    run_id=self.run_id,
                    started_at=utcnow(),
                    hostname=socket.gethostname(),
                    version=version,
                    name=name,
                    address=address,
                    pid=os.getpid(),
                    state="alive",
                )
            )

    def record_run_stopped(self, *, at: datetime | None = None) -> None:
        self.writer.submit(
            Write(
                WriteKind.RUN_STOPPED, RunStoppedParams(p_run_id=self.run_id, p_at=at or utcnow())
            )
        )

    # -- writes (queued; each is idempotent, see ccm.store.statements) ----------------------
    # Enums are stored as their values (str() of a StrEnum is its value).

    def record_connect(
        self,
        *,
        connection_id: str,
        client_id: str,
        client_type: ClientType,
        platform: str | None,
        metadata: Any,
        system_info: Any,
        remote_address: str | None,
        at: datetime,
    ) -> None:
        """A client registered on a new connection: upsert the client, insert the connection."""
        params = ConnectParams(
            p_connection_id=connection_id,
            p_client_id=client_id,
            p_client_type=str(client_type),
            p_platform=platform,
            p_metadata=json_safe(metadata),
            p_system_info=json_safe(system_info),
            p_remote_address=remote_address,
            p_server_run_id=self.run_id,
            p_at=at,
        )
        self.writer.submit(Write(WriteKind.CONNECT, params, key=client_id))

    def record_disconnect(
        self, *, connection_id: str, client_id: str, reason: DisconnectReason, at: datetime
    ) -> None:
        """A connection ended. The client goes offline only if this was its current connection."""
        params = DisconnectParams(
            p_connection_id=connection_id,
            p_client_id=client_id,
            p_reason=str(reason),
            p_at=at,
        )
        self.writer.submit(Write(WriteKind.DISCONNECT, params, key=connection_id))

    def record_system_info(self, *, client_id: str, system_info: Any) -> None:
        """A device's merged system info changed (device config reloaded)."""
        params = SystemInfoParams(p_client_id=client_id, p_system_info=json_safe(system_info))
        self.writer.submit(Write(WriteKind.SYSTEM_INFO, params, key=client_id))

    def record_last_seen(self, *, client_id: str, connection_id: str, at: datetime) -> None:
        """A client was heard from on its current connection (only ever moves forward)."""
        params = LastSeenParams(p_client_id=client_id, p_connection_id=connection_id, p_at=at)
        self.writer.submit(Write(WriteKind.LAST_SEEN, params, key=client_id))

    def record_ban(
        self, *, kind: str, subject: str, connects: int, at: datetime, until: datetime
    ) -> None:
        """A client id or remote address refused for a while for connecting too often."""
        params = BanParams(
            p_kind=kind,
            p_subject=subject,
            p_connects=connects,
            p_at=at,
            p_until=until,
            p_server_run_id=self.run_id,
        )
        self.writer.submit(Write(WriteKind.BAN, params))

    def record_session_created(
        self,
        *,
        id: str,
        session_id: str,
        task_name: str | None,
        request: str | None,
        origin: Origin,
        constellation_id: str | None,
        device_id: str,
        mode: Mode,
        state: SessionState,
        at: datetime,
    ) -> None:
        params = SessionCreatedParams(
            p_id=id,
            p_session_id=session_id,
            p_task_name=task_name,
            p_request=request,
            p_origin=str(origin),
            p_constellation_id=constellation_id,
            p_device_id=device_id,
            p_mode=str(mode),
            p_state=str(state),
            p_at=at,
            p_started_at=at if state is SessionState.RUNNING else None,
            p_server_run_id=self.run_id,
        )
        self.writer.submit(Write(WriteKind.SESSION_CREATED, params, key=id))

    def record_session_started(self, *, id: str, at: datetime) -> None:
        """A pending session runs now. Guarded: it changes only a session still pending."""
        params = SessionStartedParams(p_id=id, p_at=at)
        self.writer.submit(Write(WriteKind.SESSION_STARTED, params, key=id))

    def record_session_ended(
        self,
        *,
        id: str,
        state: SessionState,
        reason: SessionReason | None,
        result: Any,
        error: str | None,
        at: datetime,
    ) -> None:
        """A session reached a final state. Guarded so a replay never overwrites an earlier end."""
        params = SessionEndedParams(
            p_id=id,
            p_state=str(state),
            p_reason=str(reason) if reason is not None else None,
            p_result=result,
            p_error=error,
            p_at=at,
        )
        self.writer.submit(Write(WriteKind.SESSION_ENDED, params, key=id))


# -- reads: plain functions on an engine, used by the store's owner, the API and the CLI --


def read_online_clients(engine: Engine) -> list[ClientRow]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                clients.c.client_id,
                clients.c.client_type,
                clients.c.platform,
                clients.c.first_seen_at,
                clients.c.last_seen_at,
                clients.c.online,
            )
            .where(clients.c.online.is_(True))
            .order_by(clients.c.client_type, clients.c.client_id)
        ).all()
    return [ClientRow(*row) for row in rows]


def read_connection_history(
    engine: Engine,
    client_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[ConnectionRow]:
    query = select(*connections.c).where(connections.c.client_id == client_id)
    if since is not None:
        query = query.where(connections.c.connected_at >= since)
    if until is not None:
        query = query.where(connections.c.connected_at < until)
    query = query.order_by(connections.c.connected_at.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        return [ConnectionRow(**row._mapping) for row in conn.execute(query)]


def read_sessions(
    engine: Engine,
    *,
    state: str | Sequence[str] | None = None,
    device_id: str | None = None,
    constellation_id: str | None = None,
    session_id: str | None = None,
    task_name: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[SessionRow]:
    """Sessions newest first, filtered; `since`/`until` bound `created_at`."""
    query = select(*sessions.c)
    if state is not None:
        states = [state] if isinstance(state, str) else list(state)
        query = query.where(sessions.c.state.in_(states))
    if device_id is not None:
        query = query.where(sessions.c.device_id == device_id)
    if constellation_id is not None:
        query = query.where(sessions.c.constellation_id == constellation_id)
    if session_id is not None:
        query = query.where(sessions.c.session_id == session_id)
    if task_name is not None:
        query = query.where(sessions.c.task_name == task_name)
    if since is not None:
        query = query.where(sessions.c.created_at >= since)
    if until is not None:
        query = query.where(sessions.c.created_at < until)
    query = query.order_by(sessions.c.created_at.desc(), sessions.c.id).limit(limit)
    query = query.offset(offset)
    with engine.connect() as conn:
        return [
            SessionRow(**{k: v for k, v in row._mapping.items() if k != "server_run_id"})
            for row in conn.execute(query)
        ]


def read_session_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(sessions.c.state, func.count()).group_by(sessions.c.state)).all()
    return {state: count for state, count in rows}
