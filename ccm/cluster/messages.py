"""The messages nodes send each other, one TypedDict of payload per kind."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict


class MessageKind(StrEnum):
    DELIVER = "deliver"
    """A frame for a client connected to the target node."""
    START_SESSION = "start_session"
    """A task for a device connected to the target node (from a constellation or HTTP)."""
    DISPATCH_RESULT = "dispatch_result"
    """The answer to an HTTP dispatch forwarded as START_SESSION."""
    REQUESTER_GONE = "requester_gone"
    """A requester disconnected: the target node cancels the sessions it asked for."""
    CLOSE_CONNECTION = "close_connection"
    """Close one connection of a client (takeover: `replaced`; a failed probe: `stale`)."""
    PROBE = "probe"
    """Is this connection alive? (a newcomer claims its id)"""
    PROBE_RESULT = "probe_result"
    NODE_DEAD = "node_dead"
    """A node was declared dead: the sessions its reaper ended, for their other parties."""


class DeliverPayload(TypedDict):
    client_id: str
    frame: str
    ends_session: str | None
    """The session id this frame ends (a TASK_END), so the requester's node forgets it."""


class StartSessionPayload(TypedDict):
    device_id: str
    origin: str
    request: str | None
    task_name: str | None
    session_id: str | None
    requester_id: str | None
    """The constellation that asked (None for HTTP dispatch)."""
    correlation: str | None
    """Set for HTTP dispatch: the DISPATCH_RESULT carries it back."""


class DispatchResultPayload(TypedDict):
    correlation: str
    session_id: str | None
    task_name: str | None
    error: str | None
    status: int
    """The HTTP status the dispatching node answers with (200 when the session started)."""
    queue_position: NotRequired[int]
    """Its place in the device's queue (absent or 0: it runs; older nodes leave it out)."""


class RequesterGonePayload(TypedDict):
    client_id: str
    reason: str
    """A SessionReason: `constellation_disconnected`, or `node_lost` when its node died."""


class CloseConnectionPayload(TypedDict):
    client_id: str
    connection_id: str
    reason: str
    """A DisconnectReason: `replaced` or `stale`."""


class ProbePayload(TypedDict):
    client_id: str
    connection_id: str
    correlation: str


class ProbeResultPayload(TypedDict):
    correlation: str
    alive: bool


class EndedSessionPayload(TypedDict):
    session_id: str
    constellation_id: str | None
    device_id: str


class NodeDeadPayload(TypedDict):
    run_id: str
    sessions: list[EndedSessionPayload]


@dataclass(frozen=True, slots=True)
class Message:
    """One message as read from this node's inbox."""

    id: int
    source: str
    kind: MessageKind
    payload: Any
    """The kind's payload TypedDict (checked where it is read)."""
