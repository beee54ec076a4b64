"""Session orchestration: start a session (the one way, for WebSocket and HTTP alike), hand it to
its device (relay) or to a runner (agent), end it once, and tell both sides.

The durability promise lives here: a session is committed before its requester gets the ACK,
and its final state before anyone gets a `completed` TASK_END. Those waits run off the receive
loops, in tasks this object holds (and drains on shutdown), so one commit covers the sessions
of every connection that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from ccm.clock import utcnow
from ccm.config import Settings
from ccm.domain import ClientType, DisconnectReason, Mode, SessionReason, SessionState
from ccm.errors import NodeFenced, QueueFull, SessionError, StoreUnavailable
from ccm.ids import new_id
from ccm.logs import bind
from ccm.metrics import Metrics
from ccm.protocol import (
    ServerMessageType,
    TaskStatus,
    sanitize_task_name,
    server_frame,
    task_end_frame,
)
from ccm.registry import ClientConnectionManager
from ccm.server.channel import SessionChannel
from ccm.server.commits import CommitWaits
from ccm.server.router import Router
from ccm.server.runners import NO_RUNNER_ERROR, SessionRunner
from ccm.server.tasks import Requester, TaskRequest, ack_frame, execution_mode, refuse_task
from ccm.sessions import EndedSession, LiveSession, SessionManager
from ccm.store import Store

logger = logging.getLogger(__name__)

DEVICE_GONE_ERROR = "Task was cancelled because target device disconnected"
CONSTELLATION_GONE_ERROR = "Task was cancelled because the requesting constellation disconnected"
SHUTDOWN_ERROR = "the server is shutting down"
UNCONFIRMED_ERROR = "the database did not confirm the session in time; try again"
NODE_LOST_ERROR = "the requester's node was lost (its lease expired)"


def _waiting_first(sessions: Iterable[LiveSession | None]) -> list[LiveSession]:
    """Sessions to end together, pending ones first: a slot that ending a running one frees
    must not start a session that is about to end too."""
    live = [session for session in sessions if session is not None]
    return sorted(live, key=lambda session: session.state is not SessionState.PENDING)


class SessionOrchestrator:
    """Starts, runs and ends sessions; owns the tasks that wait for their commits."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: ClientConnectionManager,
        sessions: SessionManager,
        store: Store | None,
        runners: list[SessionRunner],
        router: Router,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._sessions = sessions
        self._store = store
        self._runners = runners
        self._router = router
        self._metrics = metrics
        self._command_timeout = settings.server.command_timeout.total_seconds()
        self._max_frame_bytes = settings.server.max_frame_bytes
        self.ack_timeout = max(1.0, settings.server.send_timeout.total_seconds())
        self._commits = CommitWaits(store, self.ack_timeout)

    # -- starting -------------------------------------------------------------------------------

    async def start(self, task: TaskRequest, *, wait: bool) -> LiveSession:
        """Create the session (queued for the database when this returns), then launch it once
        it is committed: ACK to the requester, the task to the device or a runner. A device at
        capacity gets it later: the session is pending, its ACK carries `metadata.
        queue_position`, and it is handed out when it reaches the head of the device's queue.

        With `wait`, return after the launch (HTTP dispatch answers with the running or pending
        session); without, the launch runs in a held task so the caller's receive loop goes on.
        Raises SessionError (QueueFull for a full queue) or StoreUnavailable, after telling the
        requester, if it cannot start."""
        mode = Mode.AGENT if task.force_agent else execution_mode(self._registry, task.device_id)
        requester = task.requester
        constellation_id = (
            requester.client_id if requester is not None and requester.is_constellation else None
        )
        task_name = sanitize_task_name(task.task_name)
        try:
            session = self._sessions.create(
                task.session_id,
                task.device_id,
                origin=task.origin,
                mode=mode,
                constellation_id=constellation_id,
                task_name=task_name,
                request=task.request,
            )
        except QueueFull as exc:  # SessionManager recorded it as failed (queue_full)
            self._metrics.count(self._metrics.sessions_ended, SessionState.FAILED.value)
            refusal = self._refuse_when_recorded(requester, task.session_id, str(exc))
            if wait:
                await refusal
            else:
                await self._commits.without_blocking(refusal)
            raise
        except (SessionError, StoreUnavailable) as exc:
            if requester is not None:
                refuse_task(requester, task.session_id, str(exc))
            raise
        self._metrics.count(self._metrics.sessions_started, session.mode.value, task.origin.value)
        if task.requester_node is not None and requester is not None:
            # A requester on another node: its ACK travels in the same transaction as the
            # session's row, so it is delivered only if the row is committed.
            session.owner_node = task.requester_node
            requester.send(ack_frame(session.session_id, session.queue_position))
            requester = None
        launch = self._launch(session, requester)
        if not wait:
            await self._commits.without_blocking(launch)
        elif not await launch:
            raise StoreUnavailable(UNCONFIRMED_ERROR)
        return session

    async def _launch(self, session: LiveSession, requester: Requester | None) -> bool:
        """Once the session is committed: ACK the requester, then hand the task to the device
        (relay) or to a runner. False if the database did not confirm (the session failed)."""
        if not await self._commits.durable():
            await self.finish(
                session,
                SessionState.FAILED,
                reason=SessionReason.STORE_UNAVAILABLE,
                error=UNCONFIRMED_ERROR,
                wait=False,
            )
            return False
        if self._sessions.get(session.session_id) is not session:
            return True  # ended meanwhile (its requester or device left): nothing to hand out
        if requester is not None:
            position = self._registry.queue_position(session.device_id, session.session_id)
            requester.send(ack_frame(session.session_id, position))
        session.run.confirmed = True
        if session.state is SessionState.PENDING:
            return True  # handed out when a slot frees (see _end)
        await self._hand_out(session)
        return True

    async def _refuse_when_recorded(
        self, requester: Requester | None, session_id: str | None, text: str
    ) -> None:
        """The refused session's row is committed (bounded wait), then the requester told."""
        await self._commits.durable()
        if requester is not None:
            refuse_task(requester, session_id, text)

    async def _hand_out(self, session: LiveSession) -> None:
        """The session runs now: the task to its device (relay) or to a runner (agent)."""
        if self._sessions.get(session.session_id) is not session:
            return  # ended while it waited for its turn
        session.run.launched = True
        if session.mode is Mode.RELAY:
            handed = self._router.send(
                session.device_id,
                server_frame(
                    ServerMessageType.TASK,
                    TaskStatus.CONTINUE,
                    user_request=session.request,
                    task_name=session.task_name,
                    session_id=session.session_id,
                ),
            )
            if not handed:
                await self.finish(
                    session,
                    SessionState.FAILED,
                    reason=SessionReason.DEVICE_DISCONNECTED,
                    error=DEVICE_GONE_ERROR,
                )
            return
        runner = next((r for r in self._runners if r.accepts(session.request)), None)
        if runner is None:
            await self.finish(
                session, SessionState.FAILED, reason=SessionReason.NO_RUNNER, error=NO_RUNNER_ERROR
            )
            return
        session.run.task = asyncio.create_task(
            self._run(session, runner), name=f"ccm-session-{session.id}"
        )

    async def _run(self, session: LiveSession, runner: SessionRunner) -> None:
        bind(session_id=session.session_id, device_id=session.device_id)
        info = self._registry.get_client_info(session.device_id)
        platform = (info.platform if info is not None else "windows").lower()
        channel = SessionChannel(session, platform, self._router, self._command_timeout)
        try:
            outcome = await runner.run(session, channel)
        except Exception as exc:  # a plug-in runner's bug fails its session only
            logger.exception("session runner crashed session_id=%s", session.session_id)
            await self.finish(
                session,
                SessionState.FAILED,
                reason=SessionReason.RUNNER_ERROR,
                error=str(exc) or repr(exc),
            )
            return
        await self.finish(
            session,
            SessionState.COMPLETED if outcome.completed else SessionState.FAILED,
            reason=None if outcome.completed else SessionReason.TASK_FAILED,
            result=outcome.result,
            error=outcome.error,
        )

    # -- ending ---------------------------------------------------------------------------------

    async def end_reported(
        self, session: LiveSession, *, completed: bool, result: Any, error: str | None
    ) -> None:
        """A relay device reported its session's outcome (a client TASK_END)."""
        ended = self._end(
            session,
            SessionState.COMPLETED if completed else SessionState.FAILED,
            reason=None if completed else SessionReason.TASK_FAILED,
            result=result,
            error=error,
        )
        if ended is not None:
            await self._commits.without_blocking(self._announce(session, ended, wait=True))

    async def finish(
        self,
        session: LiveSession,
        state: SessionState,
        *,
        reason: SessionReason | None = None,
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
            await self._announce(session, ended, wait=wait)
        return ended

    def _end(
        self,
        session: LiveSession,
        state: SessionState,
        *,
        reason: SessionReason | None,
        result: Any,
        error: str | None,
    ) -> EndedSession | None:
        """The synchronous half of finish: the session is over (and its final state queued for
        the database) when this returns. None if it had already ended."""
        ended = self._sessions.finish(
            session.session_id, state, reason=reason, result=result, error=error, run_id=session.id
        )
        if ended is None:
            return None
        self._metrics.count(self._metrics.sessions_ended, state.value)
        if session.started_at is not None:
            duration = (ended.ended_at - session.started_at).total_seconds()
            self._metrics.session_duration.labels(session.mode.value).observe(duration)
        run = session.run
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()
        for answer in run.commands.values():
            if not answer.done():
                answer.cancel()
        for started in ended.started:
            # A session still waiting for its own commit is handed out by its launch.
            if started.run.confirmed:
                self._commits.hold(self._hand_out(started))
        return ended

    async def _announce(self, session: LiveSession, ended: EndedSession, *, wait: bool) -> None:
        """TASK_END to the owner, and to the device if it was handed the session, once the final
        state is durable (a `completed` is never announced before that)."""
        completed = ended.state is SessionState.COMPLETED
        frame = task_end_frame(
            session.session_id,
            completed=completed,
            result=ended.result,
            error=ended.error,
            response_id=new_id(),
        )
        recipients = []
        if session.owner_node is not None:
            # Over the bus, in the same transaction as the final state (or a later one).
            self._router.send(session.owner_id, frame, node=session.owner_node)
        else:
            recipients.append(session.owner_id)
        if session.device_id != session.owner_id and session.run.launched:
            recipients.append(session.device_id)
        durable = await self._commits.durable() if wait and recipients else False
        if durable or not completed:
            self._router.send_all(recipients, frame)
        else:
            # The database is away. A client told `completed` relies on the result, so that
            # TASK_END waits until the state is committed (a crash before then must not leave
            # SQL saying otherwise); the connection meanwhile goes on serving other frames.
            self._commits.hold(self._send_when_durable(recipients, frame))
        if session.mode is Mode.RELAY and session.started_at is not None:
            self._metrics.relay_latency.observe((utcnow() - session.started_at).total_seconds())

    async def _send_when_durable(self, client_ids: list[str], frame: str) -> None:
        if self._store is not None:
            try:
                await self._store.writer.durable()  # resolves once the database is back
            except NodeFenced:
                return  # this node was declared dead: the survivors told the parties
        self._router.send_all(client_ids, frame)

    async def end_sessions_of(
        self,
        client_id: str,
        client_type: ClientType,
        *,
        cause: DisconnectReason = DisconnectReason.CLOSED,
        node_lost: bool = False,
    ) -> None:
        """A client left (its connection ended with `cause`): a constellation's sessions are
        cancelled, a device's fail; each is ended once and the other side is told.
        `node_lost`: it left with its node."""
        if client_type is ClientType.CONSTELLATION:
            ids = self._registry.get_constellation_sessions(client_id)
            state, reason, error = (
                SessionState.CANCELLED,
                SessionReason.CONSTELLATION_DISCONNECTED,
                CONSTELLATION_GONE_ERROR,
            )
        else:
            ids = self._registry.get_device_sessions(client_id)
            state, reason = SessionState.FAILED, SessionReason.DEVICE_DISCONNECTED
            error = self._device_gone(cause)
            if cause is DisconnectReason.FRAME_TOO_LARGE:
                reason = SessionReason.FRAME_TOO_LARGE
        if node_lost:
            reason, error = SessionReason.NODE_LOST, NODE_LOST_ERROR
        for session in _waiting_first(self._sessions.get(session_id) for session_id in ids):
            await self.finish(session, state, reason=reason, error=error)
        if client_type is ClientType.CONSTELLATION:
            self._registry.remove_constellation_sessions(client_id)
        else:
            self._registry.remove_device_sessions(client_id)

    def _device_gone(self, cause: DisconnectReason) -> str:
        """What the requester is told when the device's connection ended with `cause`: UFO's
        own text (clients may match it), but the real cause and limit for an oversized frame
        (a huge result), which a client could not guess."""
        if cause is DisconnectReason.FRAME_TOO_LARGE:
            return (
                "the device's connection was closed: it sent a frame larger than the "
                f"{self._max_frame_bytes}-byte limit (server.max_frame_bytes)"
            )
        return DEVICE_GONE_ERROR

    async def interrupt_all(
        self,
        state: SessionState = SessionState.INTERRUPTED,
        reason: SessionReason = SessionReason.SERVER_SHUTDOWN,
        error: str = SHUTDOWN_ERROR,
    ) -> None:
        """Server stopping (or fenced): every live session ends (owners told), and the held
        acknowledgements and TASK_ENDs get up to the ACK timeout to go out."""
        for session in _waiting_first(self._sessions.live_sessions()):
            await self.finish(session, state, reason=reason, error=error)
        await self._commits.drain()

    async def cancel_held(self) -> None:
        """Cancel what still waits for a commit (its clients are gone; the states stay queued)."""
        await self._commits.cancel()
