"""Hub: what the server does with each AIP frame of a registered connection.

The endpoint (`ws.py`) owns the socket and the receive loop; the hub routes each frame to the
part that owns its rule: registration (`registration.py`), identity and scope (`policy.py`),
sessions (`orchestrator.py`) and device info (here). Identity and role are the ones bound at
registration (the Peer), never the ones a later frame claims. Every reply goes to the
connection whose frame caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ccm.clock import utcnow
from ccm.config import Settings
from ccm.domain import ClientType, DisconnectReason, Mode, Origin
from ccm.errors import QueueFull, SessionError, StoreUnavailable
from ccm.metrics import Metrics
from ccm.protocol import (
    CLOSE_GOING_AWAY,
    ClientMessage,
    ClientMessageType,
    ServerMessageType,
    TaskStatus,
    error_frame,
    ok_frame,
    register_refusal,
    server_frame,
)
from ccm.registry import ClientConnectionManager
from ccm.server.channel import accept_command_results
from ccm.server.cluster_link import ClusterLink, DispatchAnswer
from ccm.server.flapping import Ban, FlapGuard
from ccm.server.forwarding import forward_task, tell_requester_gone
from ccm.server.orchestrator import SessionOrchestrator
from ccm.server.peer import Peer
from ccm.server.policy import Scope, identity_mismatch, not_connected
from ccm.server.registration import Registrar, RegistrationRefused
from ccm.server.router import Router
from ccm.server.runners import SessionRunner
from ccm.server.tasks import TaskRequest, execution_mode, refuse_task
from ccm.sessions import LiveSession, SessionManager
from ccm.store import Store

logger = logging.getLogger(__name__)

_ELSEWHERE = "elsewhere"
"""_target_problem: the device is not here, ask the cluster."""


class Hub:
    """Frame routing for all connections, and the server's side of a client leaving."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ClientConnectionManager,
        sessions: SessionManager,
        runners: list[SessionRunner],
        store: Store | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = registry
        self.sessions = sessions
        self.router = Router(registry)
        self._store = store
        self.flapping = FlapGuard(settings.flapping, on_ban=self._banned)
        self.registrar = Registrar(
            settings=settings,
            registry=registry,
            metrics=self.metrics,
            on_stale=self._stale,
            on_undo=self._undo,
            flapping=self.flapping,
        )
        self.cluster: ClusterLink | None = None
        self.orchestrator = SessionOrchestrator(
            settings=settings,
            registry=registry,
            sessions=sessions,
            store=store,
            runners=runners,
            router=self.router,
            metrics=self.metrics,
        )
        self._scope = Scope(allow_unscoped=settings.server.allow_unscoped_constellations)
        self._session_limit = settings.server.max_live_sessions_per_client
        self._send_timeout = settings.server.send_timeout.total_seconds()

    def attach(self, cluster: ClusterLink) -> None:
        """This node is part of a cluster: route to, register through and look up in it."""
        self.cluster = cluster
        self.registrar.cluster = cluster
        self.router.remote = cluster

    # -- lookups (the dashboard and the HTTP API read these) ------------------------------------

    def peer_of(self, client_id: str) -> Peer | None:
        return self.router.peer_of(client_id)

    def is_relay_device(self, device_id: str) -> bool:
        return execution_mode(self.registry, device_id) is Mode.RELAY

    # -- frames ---------------------------------------------------------------------------------

    async def register(
        self, websocket: Any, msg: ClientMessage, remote_address: str | None
    ) -> Peer:
        """See Registrar.register: raises RegistrationRefused with the text for the client."""
        if refusal := register_refusal(msg, self.settings.limits):  # sizes: before any copy
            raise RegistrationRefused(refusal)
        return await self.registrar.register(websocket, msg, remote_address)

    async def _stale(self, peer: Peer) -> None:
        await self.disconnect(peer, DisconnectReason.STALE)

    async def _undo(self, peer: Peer) -> None:
        """A registration the database refused: out of the registry, and anything begun for it
        in the meantime ended (it never had a connection row to close)."""
        await self.disconnect(peer, DisconnectReason.CLOSED)

    def _banned(self, ban: Ban) -> None:
        logger.warning("flapping: %s", ban.text(self.settings.flapping.window))
        self.metrics.flapping_bans.labels(ban.kind.value).inc()
        if self._store is not None:
            self._store.record_ban(
                kind=ban.kind.value,
                subject=ban.subject,
                connects=ban.connects,
                at=utcnow(),
                until=ban.until,
            )

    async def handle(self, peer: Peer, msg: ClientMessage) -> None:
        """Handle one frame of a registered connection (called in frame order)."""
        kind = msg.type
        self.metrics.frame_in(kind.value)
        if kind is ClientMessageType.HEARTBEAT:
            # Decision D2 (README): a heartbeat grants nothing, so only client_id is checked
            # (Galaxy sends its heartbeats with client_type "device").
            if msg.client_id is not None and msg.client_id != peer.client_id:
                peer.send(error_frame("client_id does not match the registered connection"))
                return
            self.registry.touch(peer.client_id, epoch=peer.epoch)
            peer.send(ok_frame())
            return
        mismatch = identity_mismatch(peer, msg)
        if mismatch is not None:
            if kind is ClientMessageType.TASK:
                refuse_task(peer, msg.session_id, mismatch)
            else:
                peer.send(error_frame(mismatch))
            return
        self.registry.touch(peer.client_id, epoch=peer.epoch)
        if kind is ClientMessageType.TASK:
            await self._on_task(peer, msg)
        elif kind is ClientMessageType.COMMAND_RESULTS:
            self._on_command_results(peer, msg)
        elif kind is ClientMessageType.DEVICE_INFO_REQUEST:
            self._on_device_info_request(peer, msg)
        elif kind is ClientMessageType.TASK_END:
            await self._on_task_end(peer, msg)
        elif kind is ClientMessageType.ERROR:
            # Logged, never echoed: echoing lets two peers ping-pong errors forever.
            logger.warning("client reported error client_id=%s error=%s", peer.client_id, msg.error)
        elif kind is ClientMessageType.DEVICE_INFO_RESPONSE:
            logger.debug("ignored device_info_response client_id=%s", peer.client_id)
        else:  # a second REGISTER
            peer.send(error_frame(f"Unknown message type: {kind.value} (already registered)"))

    async def _on_task(self, peer: Peer, msg: ClientMessage) -> None:
        """A TASK passes the session limit and (for a constellation) the scope and target
        checks before it becomes a session; a refusal is an ERROR plus a TASK_END `failed`."""
        live = (
            self.registry.count_constellation_sessions(peer.client_id)
            if peer.is_constellation
            else self.registry.count_device_sessions(peer.client_id)
        )
        if self.cluster is not None and peer.is_constellation:
            live += len(self.cluster.remote_sessions(peer.client_id))
        if live >= self._session_limit:
            text = f"too many running sessions ({live}, limit {self._session_limit})"
            refuse_task(peer, msg.session_id, text)
            return
        if peer.is_constellation:
            target = msg.target_id
            problem = self._target_problem(peer, target)
            if problem == _ELSEWHERE and self.cluster is not None and target is not None:
                await forward_task(self.cluster, self.registry, peer, msg, target, self._scope)
                return
            if problem is not None:
                refuse_task(peer, msg.session_id, problem)
                return
            assert target is not None
            task = TaskRequest(
                device_id=target,
                origin=Origin.CONSTELLATION,
                request=msg.request,
                task_name=msg.task_name,
                session_id=msg.session_id,
                requester=peer,
            )
        elif msg.target_id not in (None, peer.client_id):
            refuse_task(peer, msg.session_id, "Device clients may not target other devices")
            return
        else:
            # A device's own task, including the bounce of a TASK assignment: it always runs
            # through the runners (never answered with another assignment, which would loop).
            task = TaskRequest(
                device_id=peer.client_id,
                origin=Origin.DEVICE,
                request=msg.request,
                task_name=msg.task_name,
                session_id=msg.session_id,
                requester=peer,
                force_agent=True,
            )
        with contextlib.suppress(SessionError, StoreUnavailable):  # the requester was told
            await self.orchestrator.start(task, wait=False)

    def _target_problem(self, peer: Peer, target: str | None) -> str | None:
        if not target:
            return "Constellation task requests require target_id"
        if not self._scope.may_use_device(peer, target):
            return f"Not authorized to send tasks to device '{target}'"
        if not self.registry.is_device_connected(target):
            if self.registry.is_online(target):
                return "Constellation tasks may only target device clients"
            if self.cluster is not None:
                return _ELSEWHERE
            return not_connected(peer, target, self._scope, self.registry, None)
        return None

    async def dispatch(self, device_id: str, request: str, task_name: str | None) -> LiveSession:
        """HTTP dispatch: start a session on a device and return it once it is launched.
        Raises SessionError or StoreUnavailable if it cannot start."""
        task = TaskRequest(
            device_id=device_id, origin=Origin.HTTP, request=request, task_name=task_name
        )
        return await self.orchestrator.start(task, wait=True)

    async def dispatch_anywhere(
        self, device_id: str, request: str, task_name: str | None
    ) -> DispatchAnswer:
        """HTTP dispatch from any node: here if the device is connected here, else through its
        node. The answer carries the HTTP status."""
        if self.registry.is_online(device_id) or self.cluster is None:
            if not self.registry.is_online(device_id):
                return DispatchAnswer(404, error="Client not online")
            if not self.registry.is_device_connected(device_id):
                return DispatchAnswer(409, error="Tasks can only be dispatched to devices")
            try:
                session = await self.dispatch(device_id, request, task_name)
            except StoreUnavailable as exc:
                return DispatchAnswer(503, error=str(exc))
            except QueueFull as exc:
                return DispatchAnswer(429, error=str(exc))
            except SessionError as exc:
                return DispatchAnswer(409, error=str(exc))
            position = self.registry.queue_position(device_id, session.session_id)
            return DispatchAnswer(200, session.session_id, session.task_name, None, position)
        remote = await self.cluster.locate(device_id)
        if remote is None:
            return DispatchAnswer(404, error="Client not online")
        if remote.client_type is not ClientType.DEVICE:
            return DispatchAnswer(409, error="Tasks can only be dispatched to devices")
        return await self.cluster.dispatch(remote, request, task_name)

    def _on_command_results(self, peer: Peer, msg: ClientMessage) -> None:
        """Never creates anything: unknown session, wrong sender or no waiting COMMAND are
        refused with an ERROR and have no effect."""
        session = self.sessions.get(msg.session_id) if msg.session_id else None
        if session is None or not peer.is_device or session.device_id != peer.client_id:
            if msg.session_id and self.sessions.ended_recently_on(msg.session_id, peer.client_id):
                self._late(peer, msg)  # the session ended while the device worked
                return
            peer.send(error_frame("command_results refused: no such session on this device"))
            return
        results = [r.model_dump(mode="json") for r in msg.action_results or []]
        if not accept_command_results(session, msg.prev_response_id, results):
            peer.send(error_frame("command_results refused: no command is waiting for this answer"))

    def _late(self, peer: Peer, msg: ClientMessage) -> None:
        """A late answer of the session's own device: dropped quietly (UFO logs an ERROR frame
        as a server error), counted in ccm_late_frames_total."""
        logger.debug(
            "late %s dropped client_id=%s session_id=%s",
            msg.type.value,
            peer.client_id,
            msg.session_id,
        )
        self.metrics.count(self.metrics.late_frames, msg.type.value)

    async def _on_task_end(self, peer: Peer, msg: ClientMessage) -> None:
        """Relay mode: the executing device reports the outcome of a `task` it ran itself."""
        session = self.sessions.get(msg.session_id) if msg.session_id else None
        if (
            session is None
            or session.mode is not Mode.RELAY
            or not peer.is_device
            or session.device_id != peer.client_id
        ):
            if (
                session is None
                and msg.session_id
                and self.sessions.ended_recently_on(msg.session_id, peer.client_id)
            ):
                self._late(peer, msg)
                return
            peer.send(error_frame("Unknown message type: task_end (no relay session of yours)"))
            return
        if msg.status not in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            peer.send(error_frame("task_end status must be 'completed' or 'failed'"))
            return
        result: Any = None
        if msg.metadata is not None and "result" in msg.metadata:
            result = msg.metadata["result"]
        elif msg.action_results is not None:
            result = [r.model_dump(mode="json") for r in msg.action_results]
        await self.orchestrator.end_reported(
            session, completed=msg.status is TaskStatus.COMPLETED, result=result, error=msg.error
        )

    def _on_device_info_request(self, peer: Peer, msg: ClientMessage) -> None:
        if not peer.is_constellation:
            peer.send(
                error_frame("DEVICE_INFO_REQUEST is permitted only for constellation clients")
            )
            return
        if not self._scope.may_use_device(peer, msg.target_id):
            peer.send(error_frame("Not authorized to request device info for this device"))
            return
        # The live dict, not get_device_system_info's deep copy: it is encoded into the reply at
        # once, and the registry replaces a device's system info, it never changes it in place.
        client = self.registry.get_client_info(msg.target_id) if msg.target_id else None
        info = (
            client.system_info
            if client is not None and client.client_type is ClientType.DEVICE
            else None
        )
        if client is None and msg.target_id and self.cluster is not None:
            remote = self.cluster.directory.locate(msg.target_id)
            if remote is not None and remote.client_type is ClientType.DEVICE:
                info = remote.system_info
        if info is None:
            text = f"Device {msg.target_id} not found or no system info available"
            frame = server_frame(
                ServerMessageType.DEVICE_INFO_RESPONSE,
                TaskStatus.ERROR,
                error=text,
                result={"error": text},
                response_id=msg.request_id,
            )
        else:
            frame = server_frame(
                ServerMessageType.DEVICE_INFO_RESPONSE,
                TaskStatus.OK,
                result=info,
                response_id=msg.request_id,
            )
        peer.send(frame)

    # -- leaving --------------------------------------------------------------------------------

    async def disconnect(self, peer: Peer, reason: DisconnectReason) -> None:
        """A connection ended, idempotent: its sessions ended once and the other side told, the
        registry entry removed and the connection row closed with `reason`."""
        removed = self.registry.remove_client(peer.client_id, epoch=peer.epoch, reason=reason)
        await peer.stop_sender()
        if removed is not None or reason is DisconnectReason.REPLACED:
            self.metrics.disconnects.labels(reason.value).inc()
        if removed is None:
            return  # replaced by a takeover, or already gone: the new registration keeps its own
        if self.cluster is not None and peer.is_constellation:
            tell_requester_gone(self.cluster, peer.client_id)
        await self.orchestrator.end_sessions_of(peer.client_id, peer.client_type, cause=reason)

    async def close_connections(
        self,
        reason: DisconnectReason = DisconnectReason.SERVER_SHUTDOWN,
        code: int = CLOSE_GOING_AWAY,
    ) -> None:
        """Server stopping (or fenced): close every connection with `code`, each after what is
        queued for it went out (bounded by the send timeout), and record it."""
        peers = self.router.peers()
        for peer in peers:
            peer.close_reason = reason
        await asyncio.gather(*(p.flush_and_close(code, reason) for p in peers))
        for peer in peers:
            await self.disconnect(peer, reason)
