"""What a cluster node does with each message from another node."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ccm.cluster.messages import (
    CloseConnectionPayload,
    DeliverPayload,
    DispatchResultPayload,
    Message,
    MessageKind,
    NodeDeadPayload,
    ProbePayload,
    ProbeResultPayload,
    RequesterGonePayload,
    StartSessionPayload,
)
from ccm.domain import ClientType, DisconnectReason, Origin, SessionReason, SessionState
from ccm.errors import QueueFull, SessionError, StoreUnavailable
from ccm.protocol import task_end_frame
from ccm.server import ws_probe
from ccm.server.cluster_link import ClusterLink, RemoteRequester
from ccm.server.hub import Hub
from ccm.server.tasks import TaskRequest, refuse_task

logger = logging.getLogger(__name__)

NODE_LOST_ERROR = "the node that ran this session was lost (its lease expired)"


class MessageHandlers:
    def __init__(self, *, link: ClusterLink, hub: Hub) -> None:
        self._link = link
        self._hub = hub
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, message: Message) -> None:
        kind, payload, source = message.kind, message.payload, message.source
        if kind is MessageKind.DELIVER:
            self._deliver(payload)
        elif kind is MessageKind.START_SESSION:
            self._spawn(self._start_session(source, payload))
        elif kind is MessageKind.DISPATCH_RESULT:
            result: DispatchResultPayload = payload
            self._link.answer(result["correlation"], result)
        elif kind is MessageKind.PROBE_RESULT:
            probed: ProbeResultPayload = payload
            self._link.answer(probed["correlation"], probed["alive"])
        elif kind is MessageKind.REQUESTER_GONE:
            self._spawn(self._requester_gone(payload))
        elif kind is MessageKind.CLOSE_CONNECTION:
            self._spawn(self._close_connection(payload))
        elif kind is MessageKind.PROBE:
            self._spawn(self._probe(source, payload))
        elif kind is MessageKind.NODE_DEAD:
            self._spawn(self._node_dead(payload))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("cluster message handler failed", exc_info=exc)

    def _deliver(self, payload: DeliverPayload) -> None:
        client_id = payload["client_id"]
        if payload["ends_session"]:
            self._link.untrack(client_id, payload["ends_session"])
        self._hub.router.send(client_id, payload["frame"])

    async def _start_session(self, source: str, payload: StartSessionPayload) -> None:
        """A task for one of this node's devices, from a constellation or HTTP elsewhere."""
        hub, link = self._hub, self._link
        correlation = payload["correlation"]
        requester = (
            RemoteRequester(payload["requester_id"], source, link)
            if payload["requester_id"]
            else None
        )
        device_id = payload["device_id"]

        def answer(
            status: int, error: str | None, session_id: str | None = None, position: int = 0
        ) -> None:
            if correlation is not None:
                result = DispatchResultPayload(
                    correlation=correlation,
                    session_id=session_id,
                    task_name=payload["task_name"],
                    error=error,
                    status=status,
                    queue_position=position,
                )
                link.send(source, MessageKind.DISPATCH_RESULT, result)

        if not hub.registry.is_device_connected(device_id):
            text = f"Target device '{device_id}' is not connected"
            if requester is not None:
                refuse_task(requester, payload["session_id"], text)
            answer(404, text)
            return
        task = TaskRequest(
            device_id=device_id,
            origin=Origin(payload["origin"]),
            request=payload["request"],
            task_name=payload["task_name"],
            session_id=payload["session_id"],
            requester=requester,
            requester_node=source if requester is not None else None,
        )
        try:
            session = await hub.orchestrator.start(task, wait=correlation is not None)
        except QueueFull as exc:
            answer(429, str(exc))
            return
        except SessionError as exc:
            answer(409, str(exc))
            return
        except StoreUnavailable as exc:
            answer(503, str(exc))
            return
        position = hub.registry.queue_position(device_id, session.session_id)
        answer(200, None, session.session_id, position)

    async def _requester_gone(self, payload: RequesterGonePayload) -> None:
        await self._hub.orchestrator.end_sessions_of(
            payload["client_id"],
            ClientType.CONSTELLATION,
            node_lost=payload["reason"] == SessionReason.NODE_LOST,
        )

    def _local_peer(self, client_id: str, connection_id: str) -> Any:
        info = self._hub.registry.get_client_info(client_id)
        if info is None or info.connection_id != connection_id:
            return None
        return self._hub.router.peer_of(client_id)

    async def _close_connection(self, payload: CloseConnectionPayload) -> None:
        peer = self._local_peer(payload["client_id"], payload["connection_id"])
        if peer is None:
            return
        reason = DisconnectReason(payload["reason"])
        await self._hub.disconnect(peer, reason)
        peer.kick(reason)

    async def _probe(self, source: str, payload: ProbePayload) -> None:
        """A newcomer elsewhere claims this connection's id: ping it; a connection that does
        not answer is closed as `stale` before the answer goes back."""
        peer = self._local_peer(payload["client_id"], payload["connection_id"])
        alive = False
        if peer is not None:
            answered = await ws_probe.probe(peer.websocket, ws_probe.STALE_SECONDS)
            alive = answered is not False
            logger.info(
                "probed connection client_id=%s for a newcomer elsewhere: %s",
                payload["client_id"],
                "alive" if alive else "stale",
            )
            if not alive:
                await self._hub.disconnect(peer, DisconnectReason.STALE)
                peer.kick(DisconnectReason.STALE)
        result = ProbeResultPayload(correlation=payload["correlation"], alive=alive)
        self._link.send(source, MessageKind.PROBE_RESULT, result)

    async def _node_dead(self, payload: NodeDeadPayload) -> None:
        """A node was reaped: its sessions ended there (failed, `node_lost`). Tell this node's
        constellations whose sessions ran there, and cancel the sessions run here for the
        requesters that were connected there."""
        hub, link = self._hub, self._link
        run_id = payload["run_id"]
        link.directory.forget_node(run_id)
        link.abandon_requests(run_id)
        told: set[tuple[str, str]] = set()
        ended = [(s["constellation_id"], s["session_id"]) for s in payload["sessions"]]
        for client_id, session_id in [*link.remote_sessions_on(run_id), *ended]:
            if client_id is None or (client_id, session_id) in told:
                continue
            told.add((client_id, session_id))
            link.untrack(client_id, session_id)
            frame = task_end_frame(session_id, completed=False, error=NODE_LOST_ERROR)
            hub.router.send(client_id, frame)
        for session in hub.sessions.live_sessions():
            if session.owner_node == run_id:
                await hub.orchestrator.finish(
                    session,
                    SessionState.CANCELLED,
                    reason=SessionReason.NODE_LOST,
                    error="the requesting constellation's node was lost",
                )
