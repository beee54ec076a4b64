"""Errors callers branch on. Each carries the data needed to explain it."""

from __future__ import annotations


class CcmError(Exception):
    """Base of every error ccm raises on purpose."""


class ConfigError(CcmError):
    """A configuration file or value is wrong; the message names the file and key or line."""


class DuplicateClientError(CcmError):
    """A client id is already live and the duplicate policy is `reject`."""

    def __init__(self, client_id: str) -> None:
        super().__init__(
            f"client_id '{client_id}' is already registered; "
            "duplicate registrations are not allowed"
        )
        self.client_id = client_id


class SessionError(CcmError):
    """A session operation is not allowed (unknown id, already running, wrong party)."""


class QueueFull(SessionError):
    """A device is at capacity and its queue of pending sessions is at its bound."""

    def __init__(self, device_id: str, bound: int) -> None:
        super().__init__(
            f"device '{device_id}' is at capacity and its queue is full ({bound} pending, "
            "dispatch.max_queue_per_device); try again later or choose another device"
        )
        self.device_id = device_id
        self.bound = bound


class StoreUnavailable(CcmError):
    """The database cannot take writes now; the writer keeps them queued (up to its bound)."""


class StoreBacklogFull(StoreUnavailable):
    """The writer's queue is at its bound: new durable work (sessions) must be refused."""


class NodeFenced(StoreUnavailable):
    """This node's lease ran out (it was paused or cut off from the database): the cluster has
    declared it dead, so nothing it writes may land until it rejoins as a new node."""


class WriteRefused(CcmError):
    """The database refused a write for good (it was logged at ERROR and counted as lost)."""


class SchemaOutdated(CcmError):
    """The database schema is not at the migration head."""

    def __init__(self, current: str | None, head: str | None, url: str) -> None:
        super().__init__(
            f"database schema is at {current or 'nothing (empty database)'}, code expects {head}; "
            f"run `ccm db upgrade --database-url {url}` first"
        )
        self.current = current
        self.head = head


def first_line(exc: BaseException) -> str:
    """An exception's message for a one-line log or error text."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _database_away() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, OSError, TimeoutError)


DATABASE_AWAY = _database_away()
"""What a call to the database raises when it is away, refused, frozen or timed out (psycopg's
own errors arrive wrapped as SQLAlchemy's, or as OSError from the socket)."""


class HistoryUnavailable(CcmError):
    """A history read could not be answered now (database away, frozen or too busy); the live
    registry is not affected. The message says why and that a retry may work."""
