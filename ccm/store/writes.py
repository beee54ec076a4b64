"""The writes the store queues: one definition per kind, shared by the repository (which builds
them), the statement compiler (which binds their parameters by name) and the writer (which
groups and orders them).

Each kind has a TypedDict of its parameters. The repository constructs them, the statements
read their bind parameters through `binds(Params)`, and the writer's ordering rule reads the
rows a write touches through a function typed on the same TypedDict; so a misspelt parameter
is a mypy error in every one of the three places, not a write that fails at run time.
Parameter names carry a `p_` prefix: names equal to column names are reserved in INSERT and
UPDATE statements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, TypedDict, TypeVar, cast

from sqlalchemy import BindParameter, Connection, bindparam


class WriteKind(StrEnum):
    CONNECT = "connect"
    """A client registered on a new connection: upsert the client, insert the connection."""
    DISCONNECT = "disconnect"
    """A connection ended; the client goes offline if it was its current connection."""
    SYSTEM_INFO = "system_info"
    """A device's merged system info changed (device config reloaded)."""
    LAST_SEEN = "last_seen"
    """A client was heard from (heartbeats, written in periodic batches)."""
    SESSION_CREATED = "session_created"
    SESSION_STARTED = "session_started"
    """A pending session (queued for a device at capacity) runs now."""
    SESSION_ENDED = "session_ended"
    RUN_STOPPED = "run_stopped"
    BAN = "ban"
    """A client id or address refused for a while for flapping."""
    BUS_MESSAGE = "bus_message"
    """A message to another node's inbox (PostgreSQL only), delivered iff the batch commits."""


class ConnectParams(TypedDict):
    p_connection_id: str
    p_client_id: str
    p_client_type: str
    p_platform: str | None
    p_metadata: Any
    p_system_info: Any
    p_remote_address: str | None
    p_server_run_id: str
    p_at: datetime


class DisconnectParams(TypedDict):
    p_connection_id: str
    p_client_id: str
    p_reason: str
    p_at: datetime


class SystemInfoParams(TypedDict):
    p_client_id: str
    p_system_info: Any


class LastSeenParams(TypedDict):
    p_client_id: str
    p_connection_id: str
    p_at: datetime


class SessionCreatedParams(TypedDict):
    p_id: str
    p_session_id: str
    p_task_name: str | None
    p_request: str | None
    p_origin: str
    p_constellation_id: str | None
    p_device_id: str
    p_mode: str
    p_state: str
    p_at: datetime
    p_started_at: datetime | None
    p_server_run_id: str


class SessionStartedParams(TypedDict):
    p_id: str
    p_at: datetime


class SessionEndedParams(TypedDict):
    p_id: str
    p_state: str
    p_reason: str | None
    p_result: Any
    p_error: str | None
    p_at: datetime


class BanParams(TypedDict):
    p_kind: str
    p_subject: str
    p_connects: int
    p_at: datetime
    p_until: datetime
    p_server_run_id: str


class BusMessageParams(TypedDict):
    p_target_run_id: str
    p_source_run_id: str
    p_kind: str
    p_payload: Any
    p_at: datetime


class RunStoppedParams(TypedDict):
    p_run_id: str
    p_at: datetime


_P = TypeVar("_P")


def binds(params: type[_P]) -> _P:
    """A bind parameter for each key of the TypedDict `params`, typed as `params` itself, so
    that `binds(ConnectParams)["p_client_id"]` is checked by mypy like any key access."""
    keys: frozenset[str] = params.__required_keys__  # type: ignore[attr-defined]
    return cast(_P, {key: bindparam(key) for key in keys})


Bind = BindParameter[Any]

WriteFn = Callable[[Connection], None]


@dataclass(frozen=True, slots=True)
class Write:
    """One queued write of a statement kind. `key` names the row it touches; consecutive
    writes of one kind go out as one executemany as long as no key repeats in the group."""

    kind: WriteKind
    params: Mapping[str, Any]
    key: str | None = None


@dataclass(frozen=True, slots=True)
class CustomWrite:
    """A write that runs its own function on the batch's connection (maintenance, tests). The
    writer never moves anything across it."""

    name: str
    apply: WriteFn
    about: str = ""
    """What it carries, for the log line if the database refuses it (ids, never payloads)."""


QueuedWrite = Write | CustomWrite

Rows = tuple[tuple[str, object], ...]
"""(table, primary key value) of each row a write reads or writes."""


def _connect_rows(p: ConnectParams) -> Rows:
    return (("clients", p["p_client_id"]), ("connections", p["p_connection_id"]))


def _disconnect_rows(p: DisconnectParams) -> Rows:
    return (("clients", p["p_client_id"]), ("connections", p["p_connection_id"]))


def _last_seen_rows(p: LastSeenParams) -> Rows:
    return (("clients", p["p_client_id"]),)


def _session_created_rows(p: SessionCreatedParams) -> Rows:
    return (("sessions", p["p_id"]),)


def _session_started_rows(p: SessionStartedParams) -> Rows:
    return (("sessions", p["p_id"]),)


def _session_ended_rows(p: SessionEndedParams) -> Rows:
    return (("sessions", p["p_id"]),)


@dataclass(frozen=True, slots=True)
class Movable:
    """A kind the writer may move within a batch (see `ccm.store.writer`): its rank, and the
    rows a write of it touches."""

    rank: int
    rows: Callable[[Any], Rows]


MOVABLE: dict[str, Movable] = {
    WriteKind.CONNECT: Movable(0, _connect_rows),
    WriteKind.DISCONNECT: Movable(1, _disconnect_rows),
    WriteKind.LAST_SEEN: Movable(2, _last_seen_rows),
    WriteKind.SESSION_CREATED: Movable(3, _session_created_rows),
    WriteKind.SESSION_STARTED: Movable(4, _session_started_rows),
    WriteKind.SESSION_ENDED: Movable(5, _session_ended_rows),
}
"""Kinds whose writes read and write only the rows they name (guarded updates and upserts on
primary keys; the one foreign key, connections -> clients, is satisfied by the connect write's
own client upsert, run before its connection insert), so writes on different rows commute."""


_DESCRIBED_PARAMS = (
    "p_client_id",
    "p_connection_id",
    "p_id",
    "p_session_id",
    "p_state",
    "p_reason",
)


def describe(write: QueuedWrite) -> str:
    """The ids of what a lost write carried, for its log line (never its payloads)."""
    if not isinstance(write, Write):
        return write.about
    params = write.params
    return " ".join(
        f"{name[2:]}={str(params[name])[:200]!r}" for name in _DESCRIBED_PARAMS if name in params
    )


@dataclass(frozen=True, slots=True)
class WriterStats:
    queue_depth: int
    max_queue: int
    batches_committed: int
    writes_committed: int
    writes_failed: int
    failed_by_kind: dict[str, int]
    """Writes the database refused for good (lost), by write kind."""
    last_failure: str | None
    """The last lost write: kind, its row and the database's reason."""
    degraded: bool
    last_error: str | None
    last_batch_size: int
    last_commit_seconds: float


class BatchHooks(Protocol):
    """Statements run in every batch's transaction (the cluster's fencing check before the
    writes, its notifications after them)."""

    def before(self, conn: Connection) -> None:
        """Raise NodeFenced to refuse the whole batch."""

    def after(self, conn: Connection, writes: list[QueuedWrite]) -> None: ...
