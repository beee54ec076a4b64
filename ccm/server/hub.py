"""Hub: what the server does with each AIP frame once a connection is registered.

The WebSocket endpoint (`ws.py`) owns the socket and the receive loop; the hub owns the rules:
registration, identity and role checks, device info, task sessions in both execution modes, and
cleanup when a client goes. Identity and role are the ones bound at registration (the Peer), never
the ones a later frame claims. Every reply goes to the connection whose frame caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ccm.clock import utcnow
from ccm.config import Settings
from ccm.domain import ClientType, Mode, Origin, SessionState
from ccm.errors import DuplicateClientError, SessionError, StoreUnavailable
from ccm.logs import bind
from ccm.metrics import Metrics
from ccm.protocol import (
    CLOSE_GOING_AWAY,
    ClientMessage,
    ClientMessageType,
    ServerMessageType,
    TaskStatus,
    error_frame,
    new_id,
    ok_frame,
    sanitize_task_name,
    server_frame,
    task_end_frame,
)
from ccm.registry import ClientConnectionManager
from ccm.server.peer import Peer
from ccm.server.runners import NO_RUNNER_ERROR, CommandTimeout, SessionRunner
from ccm.sessions import EndedSession, LiveSession, SessionManager

logger = logging.getLogger(__name__)

RELAY_METADATA_KEY = "ccm_execution"
"""A device declares relay mode by registering with metadata `{"ccm_execution": "relay"}`."""

DEVICE_GONE_ERROR = "Task was cancelled because target device disconnected"
CONSTELLATION_GONE_ERROR = "Task was cancelled because the requesting constellation disconnected"
MAX_CLIENT_ID_LENGTH = 512


class RegistrationRefused(Exception):
    """REGISTER was refused; the text goes to the client in an ERROR frame."""


@dataclass(eq=False)
class SessionChannel:
    """CommandChannel of one agent-driven session: COMMAND out, COMMAND_RESULTS back."""

    hub: Hub
    session: LiveSession
    platform: str

    async def run_command(
        self,
        actions: list[dict[str, Any]],
        *,
        agent_name: str,
        process_name: str | None = None,
        root_name: str | None = None,
    ) -> list[dict[str, Any]]:
        device = self.hub.peer_of(self.session.device_id)
        if device is None:
            raise CommandTimeout("the device is not connected")
        response_id = new_id()
        commands = [{**action, "call_id": new_id()} for action in actions]
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        pending: dict[str, asyncio.Future[list[dict[str, Any]]]] = self.session.runtime.setdefault(
            "commands", {}
        )
        pending[response_id] = future
        try:
            device.send(
                server_frame(
                    ServerMessageType.COMMAND,
                    TaskStatus.CONTINUE,
                    agent_name=agent_name,
                    process_name=process_name,
                    root_name=root_name,
                    actions=commands,
                    session_id=self.session.session_id,
                    task_name=self.session.task_name,
                    response_id=response_id,
                )
            )
            timeout = self.hub.settings.server.command_timeout.total_seconds()
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise CommandTimeout(
                    f"device did not answer the command within {timeout:g} s"
                ) from None
        finally:
            pending.pop(response_id, None)


class Hub:
    """Registration, message handling and session orchestration for all connections."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ClientConnectionManager,
        sessions: SessionManager,
        runners: list[SessionRunner],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = registry
        self.sessions = sessions
        self.runners = runners
        self.ack_timeout = max(1.0, settings.server.send_timeout.total_seconds())
        self._held: set[asyncio.Task[None]] = set()
        """Work waiting for a commit off the receive loops: session launches (ACK, then the
        TASK to the device), task_end announcements, and `completed` task_ends held while the
        database is away (see finish_session)."""

    # -- lookups ------------------------------------------------------------------------------

    def peer_of(self, client_id: str) -> Peer | None:
        info = self.registry.get_client_info(client_id)
        return info.transport if info is not None and isinstance(info.transport, Peer) else None

    def peers(self) -> list[Peer]:
        return [p for cid in self.registry.list_clients() if (p := self.peer_of(cid)) is not None]

    def is_relay_device(self, device_id: str) -> bool:
        info = self.registry.get_client_info(device_id)
        if info is None or info.client_type is not ClientType.DEVICE:
            return False
        if info.metadata.get(RELAY_METADATA_KEY) == "relay":
            return True
        config = self.registry.device_configs.get(device_id) or {}
        return config.get("execution") == "relay"

    # -- registration ---------------------------------------------------------------------------

    def register(self, websocket: Any, msg: ClientMessage, remote_address: str | None) -> Peer:
        """Bind the identity in a REGISTER frame to a new Peer and add it to the registry.

        Raises RegistrationRefused with the text for the client. Sends the confirmation in the
        same step, so nothing can reach the client before it.
        """
        client_id = msg.client_id
        if not client_id or not client_id.strip():
            raise RegistrationRefused("REGISTER requires a non-empty client_id")
        if len(client_id) > MAX_CLIENT_ID_LENGTH:
            raise RegistrationRefused(f"client_id is longer than {MAX_CLIENT_ID_LENGTH} characters")
        client_type = ClientType(msg.client_type.value)
        metadata = dict(msg.metadata or {})
        if client_type is ClientType.CONSTELLATION and msg.target_id is not None:
            if not self.registry.is_device_connected(msg.target_id):
                raise RegistrationRefused(f"Target device '{msg.target_id}' is not connected")
        platform = metadata.get("platform")
        platform = platform if isinstance(platform, str) and platform else "windows"
        peer = Peer(
            websocket=websocket,
            client_id=client_id,
            client_type=client_type,
            remote_address=remote_address,
            send_timeout=self.settings.server.send_timeout.total_seconds(),
            metrics=self.metrics,
            target_id=msg.target_id if client_type is ClientType.CONSTELLATION else None,
        )
        try:
            info = self.registry.add_client(
                client_id,
                platform,
                peer.websocket,
                client_type,
                metadata,
                transport=peer,
                remote_address=remote_address,
            )
        except DuplicateClientError as exc:
            raise RegistrationRefused(str(exc)) from None
        self.metrics.registrations.labels(client_type.value).inc()
        bind(client_id=client_id, connection_id=info.connection_id)
        peer.epoch = info.epoch
        peer.send(ok_frame())
        if info.replaced is not None:
            old = info.replaced.transport
            info.replaced = None
            if isinstance(old, Peer):
                old.kick("replaced")
        return peer

    # -- frames ---------------------------------------------------------------------------------

    async def handle(self, peer: Peer, msg: ClientMessage) -> None:
        """Handle one frame of a registered connection (called in frame order)."""
        kind = msg.type
        self.metrics.frame_in(kind.value)
        if kind is ClientMessageType.HEARTBEAT:
            # Decision D2: a heartbeat grants nothing, so only client_id is checked (Galaxy sends
            # its heartbeats with client_type "device").
            if msg.client_id is not None and msg.client_id != peer.client_id:
                peer.send(error_frame("client_id does not match the registered connection"))
                return
            self.registry.touch(peer.client_id, epoch=peer.epoch)
            peer.send(ok_frame())
            return
        mismatch = self._identity_mismatch(peer, msg)
        if mismatch is not None:
            if kind is ClientMessageType.TASK:
                self._refuse_task(peer, msg.session_id, mismatch)
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
            # Logged, never echoed (6.13): echoing lets two peers ping-pong errors forever.
            logger.warning("client reported error client_id=%s error=%s", peer.client_id, msg.error)
        elif kind is ClientMessageType.DEVICE_INFO_RESPONSE:
            logger.debug("ignored device_info_response client_id=%s", peer.client_id)
        else:  # a second REGISTER
            peer.send(error_frame(f"Unknown message type: {kind.value} (already registered)"))

    def _identity_mismatch(self, peer: Peer, msg: ClientMessage) -> str | None:
        """Identity spoofing after registration (6.3): the frame must not claim another id/role."""
        if msg.client_id is not None and msg.client_id != peer.client_id:
            return "client_id does not match the registered connection"
        if msg.client_type.value != peer.client_type.value:
            return "client_type does not match the registered connection"
        return None

    def _may_use_device(self, peer: Peer, device_id: str | None) -> bool:
        """Scope of a constellation (6.7, 6.10): its declared target, unless unscoped is allowed."""
        if peer.target_id is not None:
            return device_id == peer.target_id
        return self.settings.server.allow_unscoped_constellations

    def _on_device_info_request(self, peer: Peer, msg: ClientMessage) -> None:
        if not peer.is_constellation:
            peer.send(
                error_frame("DEVICE_INFO_REQUEST is permitted only for constellation clients")
            )
            return
        if not self._may_use_device(peer, msg.target_id):
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
        if info is None:
            text = f"Device {msg.target_id} not found or no system info available"
            peer.send(
                server_frame(
                    ServerMessageType.DEVICE_INFO_RESPONSE,
                    TaskStatus.ERROR,
                    error=text,
                    result={"error": text},
                    response_id=msg.request_id,
                )
            )
            return
        peer.send(
            server_frame(
                ServerMessageType.DEVICE_INFO_RESPONSE,
                TaskStatus.OK,
                result=info,
                response_id=msg.request_id,
            )
        )

    # -- sessions -------------------------------------------------------------------------------

    def _refuse_task(self, peer: Peer, session_id: str | None, message: str) -> None:
        """ERROR plus (decision D4) a TASK_END `failed` so the requester need not time out."""
        peer.send(error_frame(message))
        if session_id:
            peer.send(task_end_frame(session_id, completed=False, error=message))

    async def _on_task(self, peer: Peer, msg: ClientMessage) -> None:
        limit = self.settings.server.max_live_sessions_per_client
        live = (
            self.registry.count_constellation_sessions(peer.client_id)
            if peer.is_constellation
            else self.registry.count_device_sessions(peer.client_id)
        )
        if live >= limit:
            self._refuse_task(
                peer, msg.session_id, f"too many running sessions ({live}, limit {limit})"
            )
            return
        if peer.is_constellation:
            target = msg.target_id
            if not target:
                self._refuse_task(
                    peer, msg.session_id, "Constellation task requests require target_id"
                )
                return
            if not self._may_use_device(peer, target):
                self._refuse_task(
                    peer, msg.session_id, f"Not authorized to send tasks to device '{target}'"
                )
                return
            if not self.registry.is_device_connected(target):
                text = (
                    "Constellation tasks may only target device clients"
                    if self.registry.is_online(target)
                    else f"Target device '{target}' is not connected"
                )
                self._refuse_task(peer, msg.session_id, text)
                return
            try:
                session, relay = self.create_session(
                    requester=peer,
                    session_id=msg.session_id,
                    device_id=target,
                    origin=Origin.CONSTELLATION,
                    task_name=msg.task_name,
                    request=msg.request,
                )
            except (SessionError, StoreUnavailable):
                return  # the requester was told
            # The ACK waits for the commit; this connection's next frames need not.
            await self._without_blocking(self._launch(session, peer, relay=relay))
            return
        if msg.target_id not in (None, peer.client_id):
            self._refuse_task(peer, msg.session_id, "Device clients may not target other devices")
            return
        # A device's own task, including the bounce of a TASK assignment: it always runs through
        # the runners (never answered with another assignment, which would loop).
        with contextlib.suppress(SessionError, StoreUnavailable):  # requester already told
            await self.start_session(
                requester=peer,
                session_id=msg.session_id,
                device_id=peer.client_id,
                origin=Origin.DEVICE,
                task_name=msg.task_name,
                request=msg.request,
                force_agent=True,
            )

    async def start_session(
        self,
        *,
        requester: Peer | None,
        session_id: str | None,
        device_id: str,
        origin: Origin,
        task_name: str | None,
        request: str | None,
        force_agent: bool = False,
    ) -> LiveSession:
        """Create, persist, acknowledge and launch a session. Raises SessionError/StoreUnavailable
        (after telling the requester) if it cannot start."""
        session, relay = self.create_session(
            requester=requester,
            session_id=session_id,
            device_id=device_id,
            origin=origin,
            task_name=task_name,
            request=request,
            force_agent=force_agent,
        )
        if not await self._launch(session, requester, relay=relay):
            raise StoreUnavailable("the database did not confirm the session in time")
        return session

    def create_session(
        self,
        *,
        requester: Peer | None,
        session_id: str | None,
        device_id: str,
        origin: Origin,
        task_name: str | None,
        request: str | None,
        force_agent: bool = False,
    ) -> tuple[LiveSession, bool]:
        """The synchronous half of start_session: the session exists (and is queued for the
        database) when this returns. Returns it and whether it runs in relay mode."""
        relay = not force_agent and self.is_relay_device(device_id)
        try:
            session = self.sessions.create(
                session_id,
                device_id,
                origin=origin,
                mode=Mode.RELAY if relay else Mode.AGENT,
                constellation_id=requester.client_id
                if requester is not None and requester.is_constellation
                else None,
                task_name=sanitize_task_name(task_name),
                request=request,
            )
        except (SessionError, StoreUnavailable) as exc:
            if requester is not None:
                self._refuse_task(requester, session_id, str(exc))
            raise
        self.metrics.count(self.metrics.sessions_started, session.mode.value, origin.value)
        return session, relay

    async def _launch(self, session: LiveSession, requester: Peer | None, *, relay: bool) -> bool:
        """Once the session is committed: ACK the requester, then hand the task to the device
        (relay) or to a runner. False if the database did not confirm (the session failed)."""
        if not await self._durable():
            await self.finish_session(
                session,
                SessionState.FAILED,
                reason="store_unavailable",
                error="the database did not confirm the session in time; try again",
                wait=False,
            )
            return False
        if self.sessions.get(session.session_id) is not session:
            return True  # ended meanwhile (its requester or device left): nothing to hand out
        session.runtime["launched"] = True
        if requester is not None:
            requester.send(ok_frame(session.session_id))
        if relay:
            device = self.peer_of(session.device_id)
            if device is None or not device.send(
                server_frame(
                    ServerMessageType.TASK,
                    TaskStatus.CONTINUE,
                    user_request=session.request,
                    task_name=session.task_name,
                    session_id=session.session_id,
                )
            ):
                await self.finish_session(
                    session,
                    SessionState.FAILED,
                    reason="device_disconnected",
                    error=DEVICE_GONE_ERROR,
                )
            return True
        runner = next((r for r in self.runners if r.accepts(session.request)), None)
        if runner is None:
            await self.finish_session(
                session, SessionState.FAILED, reason="no_runner", error=NO_RUNNER_ERROR
            )
            return True
        session.runtime["task"] = asyncio.create_task(
            self._run(session, runner), name=f"ccm-session-{session.id}"
        )
        return True

    async def _without_blocking(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` so that the calling receive loop need not wait for it. With a store, the
        waits inside are for group commits: a receive loop that awaited each one would put every
        session of its connection into a commit of its own, one after the other. Without a store
        nothing inside waits, so it runs here (no task to pay for)."""
        if self.registry.store is None:
            await work
            return
        self._hold(work)

    def _hold(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in a task kept in `_held` until it ends (shutdown waits for these)."""
        task = asyncio.get_running_loop().create_task(work)
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def _run(self, session: LiveSession, runner: SessionRunner) -> None:
        bind(session_id=session.session_id, device_id=session.device_id)
        info = self.registry.get_client_info(session.device_id)
        channel = SessionChannel(self, session, (info.platform if info else "windows").lower())
        try:
            outcome = await runner.run(session, channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("session runner crashed session_id=%s", session.session_id)
            await self.finish_session(
                session, SessionState.FAILED, reason="runner_error", error=str(exc) or repr(exc)
            )
            return
        await self.finish_session(
            session,
            SessionState.COMPLETED if outcome.completed else SessionState.FAILED,
            reason=None if outcome.completed else "task_failed",
            result=outcome.result,
            error=outcome.error,
        )

    def _on_command_results(self, peer: Peer, msg: ClientMessage) -> None:
        """Never creates anything (6.6): unknown session, wrong sender or no waiting COMMAND are
        refused with an ERROR and have no effect."""
        session = self.sessions.get(msg.session_id) if msg.session_id else None
        if session is None or not peer.is_device or session.device_id != peer.client_id:
            peer.send(error_frame("command_results refused: no such session on this device"))
            return
        pending = session.runtime.get("commands", {})
        future = pending.get(msg.prev_response_id) if msg.prev_response_id else None
        if future is None or future.done():
            peer.send(error_frame("command_results refused: no command is waiting for this answer"))
            return
        future.set_result([r.model_dump(mode="json") for r in msg.action_results or []])

    async def _on_task_end(self, peer: Peer, msg: ClientMessage) -> None:
        """Relay mode: the executing device reports the outcome of a `task` it ran itself."""
        session = self.sessions.get(msg.session_id) if msg.session_id else None
        if (
            session is None
            or session.mode is not Mode.RELAY
            or not peer.is_device
            or session.device_id != peer.client_id
        ):
            peer.send(error_frame("Unknown message type: task_end (no relay session of yours)"))
            return
        if msg.status not in (TaskStatus.COMPLETED, TaskStatus.FAILED):
            peer.send(error_frame("task_end status must be 'completed' or 'failed'"))
            return
        if msg.metadata is not None and "result" in msg.metadata:
            result: Any = msg.metadata["result"]
        elif msg.action_results is not None:
            result = [r.model_dump(mode="json") for r in msg.action_results]
        else:
            result = None
        completed = msg.status is TaskStatus.COMPLETED
        ended = self._end(
            session,
            SessionState.COMPLETED if completed else SessionState.FAILED,
            reason=None if completed else "task_failed",
            result=result,
            error=msg.error,
        )
        if ended is not None:
            await self._without_blocking(self._announce_end(session, ended, wait=True))

    async def finish_session(
        self,
        session: LiveSession,
        state: SessionState,
        *,
        reason: str | None = None,
        result: Any = None,
        error: str | None = None,
        wait: bool = True,
    ) -> EndedSession | None:
        """End a session once, persist it, then tell its owner and device with one TASK_END.

        The TASK_END goes out once the final state is committed. If the database does not
        confirm in time (or is known to be away, or `wait` is False), a failure is sent at
        once, but a `completed` is held until the state is committed."""
        ended = self._end(session, state, reason=reason, result=result, error=error)
        if ended is not None:
            await self._announce_end(session, ended, wait=wait)
        return ended

    def _end(
        self,
        session: LiveSession,
        state: SessionState,
        *,
        reason: str | None,
        result: Any,
        error: str | None,
    ) -> EndedSession | None:
        """The synchronous half of finish_session: the session is over (and its final state
        queued for the database) when this returns. None if it had already ended."""
        ended = self.sessions.finish(
            session.session_id, state, reason=reason, result=result, error=error, run_id=session.id
        )
        if ended is None:
            return None
        self.metrics.count(self.metrics.sessions_ended, state.value)
        if session.started_at is not None:
            duration = (ended.ended_at - session.started_at).total_seconds()
            self.metrics.session_duration.labels(session.mode.value).observe(duration)
        task = session.runtime.get("task")
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for future in session.runtime.get("commands", {}).values():
            if not future.done():
                future.cancel()
        return ended

    async def _announce_end(self, session: LiveSession, ended: EndedSession, *, wait: bool) -> None:
        """TASK_END to the owner, and to the device if it was handed the session, once the final
        state is durable (a `completed` is never announced before that)."""
        completed = ended.state is SessionState.COMPLETED
        durable = await self._durable() if wait else False
        frame = task_end_frame(
            session.session_id,
            completed=completed,
            result=ended.result,
            error=ended.error,
            response_id=new_id(),
        )
        recipients = [session.owner_id]
        if session.device_id != session.owner_id and session.runtime.get("launched"):
            recipients.append(session.device_id)
        if durable or not completed:
            self._send_to(recipients, frame)
        else:
            # The database is away. A client told `completed` relies on the result, so that
            # task_end waits until the state is committed (a crash before then must not leave
            # SQL saying otherwise); the connection meanwhile goes on serving other frames.
            self._hold(self._send_when_durable(recipients, frame))
        if session.mode is Mode.RELAY and session.started_at is not None:
            self.metrics.relay_latency.observe((utcnow() - session.started_at).total_seconds())

    def _send_to(self, client_ids: list[str], frame: str) -> None:
        for client_id in client_ids:
            peer = self.peer_of(client_id)
            if peer is not None:
                peer.send(frame)

    async def _send_when_durable(self, client_ids: list[str], frame: str) -> None:
        store = self.registry.store
        if store is not None:
            await store.writer.durable()  # resolves once the database is back and took the queue
        self._send_to(client_ids, frame)

    async def _durable(self) -> bool:
        """Wait (bounded) until queued writes are committed. False if the store did not confirm,
        at once while the database is known to be away (no connection stalls on it)."""
        store = self.registry.store
        if store is None:
            return True
        if store.writer.degraded:
            return False
        try:
            async with asyncio.timeout(self.ack_timeout):  # no extra task, unlike wait_for
                await store.writer.durable()
        except TimeoutError:
            logger.error("store did not confirm writes within %.1f s", self.ack_timeout)
            return False
        return True

    # -- leaving ---------------------------------------------------------------------------------

    async def disconnect(self, peer: Peer, reason: str) -> None:
        """The seed's cleanup checklist, idempotent: sessions ended once and the other side told,
        maps emptied, registry entry removed and the connection row closed with `reason`."""
        removed = self.registry.remove_client(peer.client_id, epoch=peer.epoch, reason=reason)
        await peer.stop_sender()
        if removed is not None or reason == "replaced":
            self.metrics.disconnects.labels(reason).inc()
        if removed is None:
            return  # replaced by a takeover, or already gone: the new registration keeps its sessions
        if peer.is_constellation:
            for session_id in self.registry.get_constellation_sessions(peer.client_id):
                session = self.sessions.get(session_id)
                if session is not None:
                    await self.finish_session(
                        session,
                        SessionState.CANCELLED,
                        reason="constellation_disconnected",
                        error=CONSTELLATION_GONE_ERROR,
                    )
            self.registry.remove_constellation_sessions(peer.client_id)
        else:
            for session_id in self.registry.get_device_sessions(peer.client_id):
                session = self.sessions.get(session_id)
                if session is not None:
                    await self.finish_session(
                        session,
                        SessionState.FAILED,
                        reason="device_disconnected",
                        error=DEVICE_GONE_ERROR,
                    )
            self.registry.remove_device_sessions(peer.client_id)

    async def shutdown(self) -> None:
        """Server stopping: end live sessions (owners told), then close every socket with 1001."""
        for session in self.sessions.live_sessions():
            await self.finish_session(
                session,
                SessionState.INTERRUPTED,
                reason="server_shutdown",
                error="the server is shutting down",
            )
        if self._held:  # acknowledgements and task_ends waiting for their commit: let them out
            await asyncio.wait(list(self._held), timeout=self.ack_timeout)
        peers = self.peers()
        for peer in peers:
            peer.close_reason = "server_shutdown"
        await asyncio.gather(
            *(p.flush_and_close(CLOSE_GOING_AWAY, "server_shutdown") for p in peers),
            return_exceptions=True,
        )
        for peer in peers:
            with contextlib.suppress(Exception):
                await self.disconnect(peer, "server_shutdown")
        for held in list(self._held):  # their clients are gone; the states stay queued
            held.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)
