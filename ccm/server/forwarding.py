"""A constellation's task for a device on another node: checked here, sent to the device's node
as START_SESSION, and remembered, so that the device's node is told when the constellation
leaves and the constellation is told when that node dies."""

from __future__ import annotations

from ccm.cluster.messages import MessageKind, RequesterGonePayload, StartSessionPayload
from ccm.domain import ClientType, Origin, SessionReason
from ccm.ids import new_id
from ccm.protocol import ClientMessage
from ccm.registry import ClientConnectionManager
from ccm.server.cluster_link import ClusterLink
from ccm.server.peer import Peer
from ccm.server.policy import Scope, not_connected
from ccm.server.tasks import refuse_task


async def forward_task(
    cluster: ClusterLink,
    registry: ClientConnectionManager,
    peer: Peer,
    msg: ClientMessage,
    target: str,
    scope: Scope,
) -> None:
    remote = await cluster.locate(target)
    if remote is None:
        refusal = not_connected(peer, target, scope, registry, cluster.directory)
        refuse_task(peer, msg.session_id, refusal)
        return
    if remote.client_type is not ClientType.DEVICE:
        refuse_task(peer, msg.session_id, "Constellation tasks may only target device clients")
        return
    session_id = msg.session_id or new_id()
    running = registry.get_constellation_sessions(peer.client_id)
    if session_id in cluster.remote_sessions(peer.client_id) or session_id in running:
        refuse_task(peer, session_id, f"session_id '{session_id}' is already running")
        return
    cluster.track(peer.client_id, session_id, remote.run_id)
    payload = StartSessionPayload(
        device_id=target,
        origin=Origin.CONSTELLATION.value,
        request=msg.request,
        task_name=msg.task_name,
        session_id=session_id,
        requester_id=peer.client_id,
        correlation=None,
    )
    cluster.send(remote.run_id, MessageKind.START_SESSION, payload)


def tell_requester_gone(cluster: ClusterLink, client_id: str) -> None:
    """This node's constellation left: the nodes running its sessions cancel them."""
    for run_id in sorted(set(cluster.forget_requester(client_id).values())):
        payload = RequesterGonePayload(
            client_id=client_id, reason=SessionReason.CONSTELLATION_DISCONNECTED.value
        )
        cluster.send(run_id, MessageKind.REQUESTER_GONE, payload)
