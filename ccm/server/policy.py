"""Who may do what once registered: identity is the one bound at registration, and a
constellation acts only within its scope (the device it declared as `target_id`)."""

from __future__ import annotations

from ccm.cluster.directory import RemoteDirectory
from ccm.domain import ClientType
from ccm.protocol import ClientMessage
from ccm.registry import ClientConnectionManager
from ccm.server.peer import Peer

LIVE_DEVICES_NAMED = 10
"""How many live devices a refusal for a device that is not connected names at most."""


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


def not_connected(
    peer: Peer,
    target: str,
    scope: Scope,
    registry: ClientConnectionManager,
    directory: RemoteDirectory | None,
) -> str:
    """The refusal for a TASK to a device that is not connected, naming the live devices the
    constellation may use instead (at most LIVE_DEVICES_NAMED; `directory`: the cluster's)."""
    text = f"Target device '{target}' is not connected"
    if peer.target_id is not None:
        return f"{text}; it is the only device this constellation may use (its target_id)"
    usable = [d for d in registry.list_clients(ClientType.DEVICE) if scope.may_use_device(peer, d)]
    if directory is not None:
        local = set(usable)
        usable += [
            c.client_id
            for c in directory.clients()
            if c.client_type is ClientType.DEVICE
            and c.client_id not in local
            and scope.may_use_device(peer, c.client_id)
        ]
    if not usable:
        return f"{text}; no device is connected"
    named = ", ".join(f"'{d}'" for d in usable[:LIVE_DEVICES_NAMED])
    more = len(usable) - LIVE_DEVICES_NAMED
    return f"{text}; live devices: {named}" + (f" and {more} more" if more > 0 else "")
