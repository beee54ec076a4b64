"""Who may do what once registered: identity is the one bound at registration, and a
constellation acts only within its scope (the device it declared as `target_id`)."""

from __future__ import annotations

from ccm.protocol import ClientMessage
from ccm.server.peer import Peer


def identity_mismatch(peer: Peer, msg: ClientMessage) -> str | None:
    """Why the frame claims another identity than its connection's, or None. A frame may omit
    `client_id`; it may not name another id or another role (identity spoofing)."""
    if msg.client_id is not None and msg.client_id != peer.client_id:
        return "client_id does not match the registered connection"
    if msg.client_type is not peer.client_type:
        return "client_type does not match the registered connection"
    return None


class Scope:
    """A constellation may act only on the device it declared at registration; one registered
    without a target may act on any device only if the operator allows unscoped ones."""

    def __init__(self, *, allow_unscoped: bool) -> None:
        self._allow_unscoped = allow_unscoped

    def may_use_device(self, peer: Peer, device_id: str | None) -> bool:
        if peer.target_id is not None:
            return device_id == peer.target_id
        return self._allow_unscoped
