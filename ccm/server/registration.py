"""Registration: a REGISTER frame's identity bound to a new Peer and added to the registry.

Refusals raise RegistrationRefused with the text for the client; the endpoint sends it in an
ERROR frame and closes. The confirmation is sent in the same step as the registry entry is made,
so nothing can reach a client before it.
"""

from __future__ import annotations

from typing import Any

from ccm.config import Settings
from ccm.domain import ClientType, DisconnectReason
from ccm.errors import DuplicateClientError
from ccm.logs import bind
from ccm.metrics import Metrics
from ccm.protocol import ClientMessage, ok_frame
from ccm.registry import ClientConnectionManager
from ccm.server.peer import Peer

MAX_CLIENT_ID_LENGTH = 512
DEFAULT_PLATFORM = "windows"
"""UFO's own default when a device reports none."""


class RegistrationRefused(Exception):
    """REGISTER was refused; the text goes to the client in an ERROR frame."""


class Registrar:
    """Turns a REGISTER into a registered Peer, or a refusal."""

    def __init__(
        self, *, settings: Settings, registry: ClientConnectionManager, metrics: Metrics
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._send_timeout = settings.server.send_timeout.total_seconds()

    def register(self, websocket: Any, msg: ClientMessage, remote_address: str | None) -> Peer:
        client_id = msg.client_id
        if not client_id or not client_id.strip():
            raise RegistrationRefused("REGISTER requires a non-empty client_id")
        if len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise RegistrationRefused(f"client_id is longer than {MAX_CLIENT_ID_LENGTH} characters")
        client_type = msg.client_type
        target_id = msg.target_id if client_type is ClientType.CONSTELLATION else None
        if target_id is not None and not self._registry.is_device_connected(target_id):
            raise RegistrationRefused(f"Target device '{target_id}' is not connected")
        metadata = dict(msg.metadata or {})
        platform = metadata.get("platform")
        peer = Peer(
            websocket=websocket,
            client_id=client_id,
            client_type=client_type,
            remote_address=remote_address,
            send_timeout=self._send_timeout,
            metrics=self._metrics,
            target_id=target_id,
        )
        try:
            info = self._registry.add_client(
                client_id,
                platform if isinstance(platform, str) and platform else DEFAULT_PLATFORM,
                websocket,
                client_type,
                metadata,
                transport=peer,
                remote_address=remote_address,
            )
        except DuplicateClientError as exc:
            raise RegistrationRefused(str(exc)) from None
        self._metrics.registrations.labels(client_type.value).inc()
        bind(client_id=client_id, connection_id=info.connection_id)
        peer.epoch = info.epoch
        peer.send(ok_frame())
        replaced, info.replaced = info.replaced, None
        if replaced is not None and isinstance(replaced.transport, Peer):
            replaced.transport.kick(DisconnectReason.REPLACED)
        return peer
