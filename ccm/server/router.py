"""Router: where a frame for a client id goes.

Every frame the server sends to a client other than the one whose frame it is handling (the
TASK to a device, a TASK_END to a requester, a COMMAND) goes through here, so that there is one
place that knows where a client's connection is: the Peer registered in the live registry, or,
in a cluster, another node (reached over the bus).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ccm.registry import ClientConnectionManager
from ccm.server.peer import Peer


class RemoteDelivery(Protocol):
    def deliver(self, node: str, client_id: str, frame: str) -> None: ...


class Router:
    """Looks up a client's live connection and delivers frames to it."""

    def __init__(self, registry: ClientConnectionManager) -> None:
        self._registry = registry
        self.remote: RemoteDelivery | None = None
        """Set on a cluster node: how frames reach clients of the other nodes."""

    def peer_of(self, client_id: str) -> Peer | None:
        """The live connection of `client_id`, or None."""
        info = self._registry.get_client_info(client_id)
        if info is None:
            return None
        transport = info.transport
        return transport if isinstance(transport, Peer) else None

    def peers(self) -> list[Peer]:
        """Every live connection, in registration order."""
        return [p for cid in self._registry.list_clients() if (p := self.peer_of(cid)) is not None]

    def send(self, client_id: str, frame: str, *, node: str | None = None) -> bool:
        """Queue `frame` for `client_id`, connected here or (with `node`) to another node. False
        if it has no live connection here (or it is closing)."""
        if node is not None and self.remote is not None:
            self.remote.deliver(node, client_id, frame)
            return True
        peer = self.peer_of(client_id)
        return peer is not None and peer.send(frame)

    def send_all(self, client_ids: Iterable[str], frame: str) -> None:
        for client_id in client_ids:
            self.send(client_id, frame)
