"""ClientInfo: one live client connection in the registry (re-exported by ccm.registry)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ccm.domain import ClientType

_epochs = itertools.count(1)


def next_epoch() -> int:
    """The next registration's epoch (call under the registry's lock: epochs follow the order
    of registrations)."""
    return next(_epochs)


@dataclass(eq=False)
class ClientInfo:
    """One live client connection: UFO's ClientInfo fields plus the ids ccm needs.

    `epoch` grows with every registration, so a late disconnect of a replaced socket can be told
    apart from the current one; `connection_id` is the key of this connection's SQL row.
    """

    websocket: Any
    client_type: ClientType
    connected_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    platform: str = "windows"
    system_info: dict[str, Any] | None = None
    transport: Any = None
    task_protocol: Any = None
    client_id: str = ""
    connection_id: str = ""
    epoch: int = 0
    remote_address: str | None = None
    reported_system_info: dict[str, Any] | None = None
    last_heartbeat_at: datetime | None = None
    replaced: ClientInfo | None = None
    """Set on the new entry when the takeover policy evicted a live connection (to be closed)."""
