"""Registration: a REGISTER frame's identity bound to a new Peer and added to the registry.

Refusals raise RegistrationRefused with the text for the client; the endpoint sends it in an
ERROR frame and closes. The confirmation goes out once the registration holds, so nothing can
reach a client before it.

A live id is refused (policy `reject`) only while its connection is provably alive: the old
connection is pinged, and one that does not answer in time is closed as `stale` and the
newcomer accepted. In a cluster the id is claimed in the database (one round trip), so two nodes
cannot both accept it; the holder on another node is probed, or closed (`takeover`), through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ccm.client_info import ClientInfo
from ccm.cluster.messages import CloseConnectionPayload, MessageKind, ProbePayload
from ccm.config import DuplicatePolicy, Settings
from ccm.domain import ClientType, DisconnectReason
from ccm.errors import DATABASE_AWAY, DuplicateClientError, NodeFenced, WriteRefused
from ccm.ids import new_id
from ccm.logs import bind
from ccm.metrics import Metrics
from ccm.protocol import ClientMessage, ok_frame
from ccm.registry import ClientConnectionManager
from ccm.server import ws_probe
from ccm.server.cluster_link import ClusterLink
from ccm.server.flapping import FlapGuard
from ccm.server.peer import Peer
from ccm.store.claims import Claim, holder_of
from ccm.store.models import clients, column_length

logger = logging.getLogger(__name__)

MAX_CLIENT_ID_LENGTH = column_length(clients.c.client_id)
MAX_PLATFORM_LENGTH = column_length(clients.c.platform)
DEFAULT_PLATFORM = "windows"
"""UFO's own default when a device reports none."""
CLAIM_ATTEMPTS = 3


class RegistrationRefused(Exception):
    """REGISTER was refused; the text goes to the client in an ERROR frame, `kind` to the
    refusal metric."""

    def __init__(self, text: str, *, kind: str = "refused") -> None:
        super().__init__(text)
        self.kind = kind


class Registrar:
    """Turns a REGISTER into a registered Peer, or a refusal."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ClientConnectionManager,
        metrics: Metrics,
        on_stale: Callable[[Peer], Awaitable[None]],
        on_undo: Callable[[Peer], Awaitable[None]],
        flapping: FlapGuard,
    ) -> None:
        self._on_undo = on_undo
        self._registry = registry
        self._flapping = flapping
        self._metrics = metrics
        self._on_stale = on_stale
        self._send_timeout = settings.server.send_timeout.total_seconds()
        self._takeover = settings.duplicate_policy is DuplicatePolicy.TAKEOVER
        self.cluster: ClusterLink | None = None

    async def register(
        self, websocket: Any, msg: ClientMessage, remote_address: str | None
    ) -> Peer:
        client_id = msg.client_id
        if not client_id or not client_id.strip():
            raise RegistrationRefused("REGISTER requires a non-empty client_id")
        if len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise RegistrationRefused(f"client_id is longer than {MAX_CLIENT_ID_LENGTH} characters")
        flapping = self._flapping.check_client(client_id)
        if flapping is not None:
            raise RegistrationRefused(flapping, kind="flapping")
        client_type = msg.client_type
        target_id = msg.target_id if client_type is ClientType.CONSTELLATION else None
        if target_id is not None and not await self._device_exists(target_id):
            raise RegistrationRefused(f"Target device '{target_id}' is not connected")
        metadata = dict(msg.metadata or {})
        platform = metadata.get("platform")
        if isinstance(platform, str) and len(platform) > MAX_PLATFORM_LENGTH:
            raise RegistrationRefused(
                f"metadata.platform is longer than {MAX_PLATFORM_LENGTH} characters"
            )
        peer = Peer(
            websocket=websocket,
            client_id=client_id,
            client_type=client_type,
            remote_address=remote_address,
            send_timeout=self._send_timeout,
            metrics=self._metrics,
            target_id=target_id,
        )

        def add() -> ClientInfo:
            return self._registry.add_client(
                client_id,
                platform if isinstance(platform, str) and platform else DEFAULT_PLATFORM,
                websocket,
                client_type,
                metadata,
                transport=peer,
                remote_address=remote_address,
                record=self.cluster is None,  # a cluster node claims the id in the database
            )

        try:
            info = add()
        except DuplicateClientError as exc:
            if not await self._close_if_stale(client_id):
                raise RegistrationRefused(str(exc)) from None
            try:
                info = add()
            except DuplicateClientError as again:  # another newcomer won the race
                raise RegistrationRefused(str(again)) from None
        peer.epoch = info.epoch
        if self.cluster is not None:
            try:
                await self._claim(info, self.cluster)
            except RegistrationRefused:
                await self._on_undo(peer)  # anything begun for it meanwhile ends with it
                raise
        self._metrics.registrations.labels(client_type.value).inc()
        bind(client_id=client_id, connection_id=info.connection_id)
        peer.send(ok_frame())
        replaced, info.replaced = info.replaced, None
        if replaced is not None and isinstance(replaced.transport, Peer):
            replaced.transport.kick(DisconnectReason.REPLACED)
        return peer

    async def _device_exists(self, device_id: str) -> bool:
        if self._registry.is_device_connected(device_id):
            return True
        if self.cluster is None:
            return False
        remote = await self.cluster.locate(device_id)
        return remote is not None and remote.client_type is ClientType.DEVICE

    async def _close_if_stale(self, client_id: str) -> bool:
        """The id is live on this node: ping its connection. One that does not answer is closed
        as `stale` (True: the newcomer may have the id); one that answers keeps it."""
        info = self._registry.get_client_info(client_id)
        old = info.transport if info is not None else None
        if not isinstance(old, Peer):
            return False
        if await ws_probe.probe(old.websocket, ws_probe.STALE_SECONDS) is not False:
            return False
        logger.warning("closing stale connection client_id=%s: no answer to a ping", client_id)
        await self._on_stale(old)
        old.kick(DisconnectReason.STALE)
        return True

    async def _claim(self, info: ClientInfo, cluster: ClusterLink) -> None:
        """Make the id this connection's in the database, or undo the registration and refuse."""
        peer = info.transport
        assert isinstance(peer, Peer)
        try:
            for _attempt in range(CLAIM_ATTEMPTS):
                outcome = await cluster.claim(
                    info,
                    takeover=self._takeover,
                    on_lost=lambda: self._lost_claim(peer),
                    on_replaced=lambda done: self._close_replaced(cluster, info, done),
                )
                if outcome is None:
                    return  # the database is away: accepted now, settled when it is back
                if outcome.claimed:
                    self._close_replaced(cluster, info, outcome)
                    return
                if outcome.holder is None or not await self._holder_gave_up(
                    cluster, info.client_id, outcome.holder
                ):
                    break
        except NodeFenced:
            raise RegistrationRefused(
                "this node is rejoining the cluster; connect again (to any node)"
            ) from None
        except WriteRefused:
            raise RegistrationRefused(
                "the database refused to store this registration (the server logged why); "
                "ask the operator",
                kind="write_refused",
            ) from None
        raise RegistrationRefused(str(DuplicateClientError(info.client_id)))

    def _close_replaced(self, cluster: ClusterLink, info: ClientInfo, outcome: Claim) -> None:
        """Takeover: the nodes holding the connections the claim closed close their sockets."""
        for connection_id, run_id in outcome.replaced:
            if run_id != cluster.me:
                payload = CloseConnectionPayload(
                    client_id=info.client_id,
                    connection_id=connection_id,
                    reason=DisconnectReason.REPLACED.value,
                )
                cluster.send(run_id, MessageKind.CLOSE_CONNECTION, payload)

    async def _lost_claim(self, peer: Peer) -> None:
        """Accepted while the database was away, but the id was held elsewhere all along."""
        logger.warning(
            "closing client_id=%s: accepted while the database was away, its id is held by a "
            "connection on another node",
            peer.client_id,
        )
        await self._on_undo(peer)
        peer.kick(DisconnectReason.DUPLICATE)

    async def _holder_gave_up(
        self, cluster: ClusterLink, client_id: str, holder: tuple[str, str]
    ) -> bool:
        """The id is held by a connection on another node: True if that one is gone now (its
        node is dead and was reaped, or it did not answer a ping and was closed as `stale`)."""
        connection_id, run_id = holder
        gone = await self._holder_gone(cluster, client_id)
        if gone is not None:
            return gone
        if run_id == cluster.me:
            return False  # held here by a live connection (a race with another newcomer)
        payload = ProbePayload(
            client_id=client_id, connection_id=connection_id, correlation=new_id()
        )
        try:
            alive = await cluster.request(
                run_id, MessageKind.PROBE, payload, ws_probe.STALE_SECONDS + cluster.ack_timeout
            )
        except TimeoutError:
            logger.warning("no answer from node %s probing client_id=%s", run_id, client_id)
            # A node that does not answer may have died: if its lease ran out (or it was
            # reaped) while we waited, the id is free now, not only at the device's next try.
            return bool(await self._holder_gone(cluster, client_id))
        return not alive

    async def _holder_gone(self, cluster: ClusterLink, client_id: str) -> bool | None:
        """True if nobody holds `client_id` any more or its holder's node lease ran out (then
        it is reaped now rather than at the next tick); False if the database cannot tell (the
        holder keeps the id); None if a live node still holds it."""
        try:
            found = await asyncio.to_thread(holder_of, cluster.store.engine, client_id)
        except DATABASE_AWAY:
            return False
        if found is None:
            return True  # closed meanwhile
        if not found[2]:
            await cluster.lease.reap_expired()
            return True
        return None
