"""Router: where a frame for a client id goes.

Every frame the server sends to a client other than the one whose frame it is handling (the
TASK to a device, a TASK_END to a requester, a COMMAND) goes through here, so that there is one
place that knows where a client's connection is: the Peer registered in the live registry.
"""

from __future__ import annotations

from collections.abc import Iterable

from ccm.registry import ClientConnectionManager
from ccm.server.peer import Peer


class Router:
    """Looks up a client's live connection and delivers frames to it."""

    def __init__(self, registry: ClientConnectionManager) -> None:
        self._registry = registry

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

    def send(self, client_id: str, frame: str) -> bool:
        """Queue `frame` for `client_id`. False if it has no live connection (or it is closing)."""
        peer = self.peer_of(client_id)
        return peer is not None and peer.send(frame)

    def send_all(self, client_ids: Iterable[str], frame: str) -> None:
        for client_id in client_ids:
            self.send(client_id, frame)
