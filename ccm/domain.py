"""The vocabulary every layer shares: client types, session states, execution modes, origins,
and the reasons recorded when a connection or a session ends.

This module imports nothing of ccm. The store, the registry, the sessions and the AIP side all
depend on it, never the other way round. The values are the strings stored in SQL and sent on
the wire, so changing one is a data migration.
"""

from __future__ import annotations

from enum import StrEnum


class ClientType(StrEnum):
    """The role a client registered with (AIP's `client_type`)."""

    DEVICE = "device"
    CONSTELLATION = "constellation"


class SessionState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


FINISHED_STATES = frozenset(
    {SessionState.COMPLETED, SessionState.FAILED, SessionState.CANCELLED, SessionState.INTERRUPTED}
)
LIVE_STATES = frozenset({SessionState.PENDING, SessionState.RUNNING})


class Mode(StrEnum):
    """How a session is executed: the device runs the task itself (relay), or a ccm runner
    drives a stock device with COMMAND rounds (agent)."""

    RELAY = "relay"
    AGENT = "agent"


class Origin(StrEnum):
    """Who asked for a session."""

    CONSTELLATION = "constellation"
    DEVICE = "device"
    HTTP = "http"


class DisconnectReason(StrEnum):
    """Why a registered connection ended (`connections.disconnect_reason`)."""

    CLOSED = "closed"
    """The client closed the connection (close code 1000/1001 or none)."""
    CONNECTION_LOST = "connection_lost"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    REPLACED = "replaced"
    """Taken over by a newer registration of the same id (duplicate policy `takeover`)."""
    SLOW_CONSUMER = "slow_consumer"
    FRAME_TOO_LARGE = "frame_too_large"
    PROTOCOL_ERROR = "protocol_error"
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_RESTART = "server_restart"
    """Closed by restart recovery: the process that held it is gone."""
    NODE_LOST = "node_lost"
    """Closed by a surviving node: the node that held it stopped renewing its lease."""
    NODE_FENCED = "node_fenced"
    """Closed by its own node, which found its lease expired (it was paused or cut off)."""
    DUPLICATE = "duplicate"
    """Accepted while the database was away; when it was back, the id was held elsewhere."""
    STALE = "stale"
    """A newcomer claimed the id and this connection did not answer a ping in time."""


class SessionReason(StrEnum):
    """Why a session did not complete (`sessions.reason`)."""

    CONSTELLATION_DISCONNECTED = "constellation_disconnected"
    DEVICE_DISCONNECTED = "device_disconnected"
    TASK_FAILED = "task_failed"
    NO_RUNNER = "no_runner"
    RUNNER_ERROR = "runner_error"
    SERVER_SHUTDOWN = "server_shutdown"
    SERVER_RESTART = "server_restart"
    STORE_UNAVAILABLE = "store_unavailable"
    FRAME_TOO_LARGE = "frame_too_large"
    """The device's connection was closed for a frame over the size limit (a huge result)."""
    NODE_LOST = "node_lost"
    """The node that ran it, or the node its requester was connected to, was lost."""
    QUEUE_FULL = "queue_full"
    """Its device was at capacity and the device's queue was at `dispatch.max_queue_per_device`."""


class RejectReason(StrEnum):
    """Why device selection passed a device over (`/api/devices/select?explain=true`)."""

    OFFLINE = "offline"
    """Named in the device config, not connected."""
    WRONG_PLATFORM = "wrong_platform"
    MISSING_CAPABILITY = "missing_capability"
    AT_CAPACITY = "at_capacity"
