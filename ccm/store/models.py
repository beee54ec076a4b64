"""The SQL schema: clients, connections, sessions and server runs.

Alembic owns the schema (`migrations/`); these models are its source for autogenerate and the
tables the store writes with SQLAlchemy Core. Every time is timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always aware UTC in Python, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONValue = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ServerRunRecord(Base):
    """One process lifetime of ccm: a node of the cluster (one node when on SQLite).

    Connections and sessions name the run that holds them (`server_run_id`). On PostgreSQL the
    run holds a lease (`lease_until`, renewed with the database's clock); a run whose lease has
    expired is declared `dead` by a survivor, which closes what it held.
    """

    __tablename__ = "server_runs"

    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hostname: Mapped[str | None] = mapped_column(String(255))
    version: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(255))
    """The operator's name for the node (`cluster.node_name`), or host:port."""
    address: Mapped[str | None] = mapped_column(String(255))
    """Where clients reach this node (host:port)."""
    pid: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), server_default="left")
    """`alive`, `left` (stopped cleanly) or `dead` (its lease expired; closed by a survivor)."""
    renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_reason: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_server_runs_state_lease_until", "state", "lease_until"),)


class ClientRecord(Base):
    """Every client id ever seen, with what it last reported and whether it is online now."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    client_type: Mapped[str] = mapped_column(String(16))
    platform: Mapped[str | None] = mapped_column(String(64))
    client_metadata: Mapped[Any] = mapped_column("metadata", JSONValue, nullable=True)
    system_info: Mapped[Any] = mapped_column(JSONValue, nullable=True)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    online: Mapped[bool] = mapped_column(default=False)
    current_connection_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (Index("ix_clients_online_client_type", "online", "client_type"),)


class ConnectionRecord(Base):
    """One WebSocket connection that registered: when, from where, and why it ended."""

    __tablename__ = "connections"

    connection_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(512), ForeignKey("clients.client_id"))
    client_type: Mapped[str] = mapped_column(String(16))
    connected_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disconnected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disconnect_reason: Mapped[str | None] = mapped_column(String(64))
    remote_address: Mapped[str | None] = mapped_column(String(128))
    server_run_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        Index("ix_connections_client_id_connected_at", "client_id", "connected_at"),
        Index("ix_connections_disconnected_at", "disconnected_at"),
        # At most one open connection per client id, across every node: two nodes racing on
        # one id cannot both win (the database decides).
        Index(
            "ux_connections_open_client_id",
            "client_id",
            unique=True,
            postgresql_where=text("disconnected_at IS NULL"),
            sqlite_where=text("disconnected_at IS NULL"),
        ),
        Index(
            "ix_connections_open_server_run_id",
            "server_run_id",
            postgresql_where=text("disconnected_at IS NULL"),
            sqlite_where=text("disconnected_at IS NULL"),
        ),
    )


class SessionRecord(Base):
    """One run of one task: who asked, where it ran, and how it ended.

    `id` is ccm's own key for the run; `session_id` is the wire id, which a constellation may use
    again for a later run once the earlier one has finished.
    """

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(512))
    task_name: Mapped[str | None] = mapped_column(String(255))
    request: Mapped[str | None] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(16))
    """Who asked: `constellation`, `device` (its own task) or `http` (dispatch API)."""
    constellation_id: Mapped[str | None] = mapped_column(String(512))
    device_id: Mapped[str] = mapped_column(String(512))
    mode: Mapped[str] = mapped_column(String(16))
    """`relay` (the device runs the task) or `agent` (a ccm runner drives it with commands)."""
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    """Why it was cancelled, failed or interrupted (a `ccm.domain.SessionReason`)."""
    result: Mapped[Any] = mapped_column(JSONValue, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    server_run_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        Index("ix_sessions_session_id", "session_id"),
        Index("ix_sessions_device_id_created_at", "device_id", "created_at"),
        Index("ix_sessions_constellation_id_created_at", "constellation_id", "created_at"),
        Index("ix_sessions_state_ended_at", "state", "ended_at"),
        Index("ix_sessions_task_name_created_at", "task_name", "created_at"),
        Index("ix_sessions_created_at", "created_at"),
        Index("ix_sessions_server_run_id_state", "server_run_id", "state"),
    )


class BanRecord(Base):
    """A client id or remote address refused for a while for connecting too often."""

    __tablename__ = "bans"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    """`client_id` or `remote_address`."""
    subject: Mapped[str] = mapped_column(String(512))
    connects: Mapped[int] = mapped_column(Integer)
    """Connections counted in the window when the ban began."""
    banned_at: Mapped[datetime] = mapped_column(UTCDateTime())
    until: Mapped[datetime] = mapped_column(UTCDateTime())
    server_run_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (Index("ix_bans_subject_banned_at", "subject", "banned_at"),)


class InboxRecord(Base):
    """Messages between nodes, one inbox per target run: a row is written in the sender's
    transaction (so it exists only if that commits), announced with NOTIFY, and deleted by the
    target as it reads it."""

    __tablename__ = "inbox"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    target_run_id: Mapped[str] = mapped_column(String(36))
    source_run_id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[Any] = mapped_column(JSONValue, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_inbox_target_run_id_id", "target_run_id", "id"),)


def column_length(column: Any) -> int:
    """The declared length of a String column: what the edge must refuse beyond (PostgreSQL
    refuses a longer value; SQLite would store it)."""
    length = getattr(column.type, "length", None)
    assert isinstance(length, int), f"{column} has no length"
    return length


def _table(record: type[Base]) -> Table:
    """The record's Table. Declarative types `__table__` as a FromClause (it may be a join for
    mapped classes in general); ours are plain tables, and the store's statements need Table."""
    table = record.__table__
    assert isinstance(table, Table)
    return table


clients = _table(ClientRecord)
connections = _table(ConnectionRecord)
sessions = _table(SessionRecord)
server_runs = _table(ServerRunRecord)
inbox = _table(InboxRecord)
bans = _table(BanRecord)
