"""SessionManager: the life of a task session, from creation to one final state.

A session is live (pending or running) until it ends exactly once: completed, failed, cancelled or
interrupted. It is pending while its device is at capacity (queued in arrival order, see
`ccm.device_load`) and runs when a session of that device ends. Ending is idempotent: the first
call wins and returns the session, later calls return None, so a constellation and its device
disconnecting together end each session once. Ending also drops the session from the registry's
maps, so nothing accumulates.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ccm.clock import Clock, utcnow
from ccm.domain import FINISHED_STATES, Mode, Origin, SessionReason, SessionState
from ccm.errors import QueueFull, SessionError
from ccm.ids import new_id
from ccm.registry import ClientConnectionManager

if TYPE_CHECKING:
    from ccm.store import Store

logger = logging.getLogger(__name__)

MAX_SESSION_ID_LENGTH = 512
"""sessions.session_id's length."""
MAX_TASK_NAME_LENGTH = 255
"""sessions.task_name's length."""
RECENTLY_ENDED = 4096


@dataclass(eq=False, slots=True)
class SessionRun:
    """How a live session is being executed, never persisted: set by whoever runs it."""

    launched: bool = False
    """The device was handed the session (relay TASK sent, or a runner started)."""
    confirmed: bool = False
    """Its row was committed and its requester acknowledged (a queued one waits after it)."""
    task: asyncio.Task[None] | None = None
    """The runner's task (agent mode), cancelled when the session ends first."""
    commands: dict[str, asyncio.Future[list[dict[str, Any]]]] = field(default_factory=dict)
    """COMMANDs waiting for their COMMAND_RESULTS, by the COMMAND's response id."""


@dataclass(eq=False)
class LiveSession:
    """A session that has not ended yet. `id` is ccm's run key; `session_id` the wire id."""

    id: str
    session_id: str
    device_id: str
    origin: Origin
    mode: Mode
    constellation_id: str | None = None
    task_name: str | None = None
    request: str | None = None
    state: SessionState = SessionState.RUNNING
    queue_position: int = 0
    """Its place in its device's queue when it was created (1 is next); 0: it ran at once."""
    created_at: datetime | None = None
    started_at: datetime | None = None
    owner_id: str = ""
    """The client that gets the TASK_END: the constellation, or the device for its own task."""
    owner_node: str | None = None
    """The node the owner is connected to, when it is not this one (a cluster)."""
    run: SessionRun = field(default_factory=SessionRun)


@dataclass(frozen=True, slots=True)
class EndedSession:
    """What ending a session produced; returned only to the caller that actually ended it."""

    session: LiveSession
    state: SessionState
    reason: SessionReason | None
    result: Any
    error: str | None
    ended_at: datetime
    started: list[LiveSession] = field(default_factory=list)
    """Pending sessions of its device that run now, in the slot it freed (oldest first)."""


class SessionManager:
    """Live sessions in memory, their history written through `store` (None: memory only)."""

    def __init__(
        self,
        registry: ClientConnectionManager,
        *,
        store: Store | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._registry = registry
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, LiveSession] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        """The last RECENTLY_ENDED wire session ids that ended, and their devices."""

    def create(
        self,
        session_id: str | None,
        device_id: str,
        *,
        origin: Origin,
        mode: Mode,
        constellation_id: str | None = None,
        task_name: str | None = None,
        request: str | None = None,
        track_for_device: bool = True,
    ) -> LiveSession:
        """Start a session: running if its device has room, else pending in the device's queue.
        A `session_id` that is live already is refused (SessionError), a device whose queue is
        at its bound too (QueueFull), and any new session while the store cannot confirm it:
        its queue at the bound (StoreBacklogFull) or the database not taking writes
        (StoreUnavailable)."""
        session_id = session_id or new_id()
        if len(session_id) > MAX_SESSION_ID_LENGTH:
            raise SessionError(f"session_id is longer than {MAX_SESSION_ID_LENGTH} characters")
        if task_name is not None and len(task_name) > MAX_TASK_NAME_LENGTH:
            raise SessionError(f"task_name is longer than {MAX_TASK_NAME_LENGTH} characters")
        if self._store is not None:
            self._store.writer.reserve()
        now = self._clock()
        owner = (
            constellation_id if origin is Origin.CONSTELLATION and constellation_id else device_id
        )
        session = LiveSession(
            id=new_id(),
            session_id=session_id,
            device_id=device_id,
            origin=origin,
            mode=mode,
            constellation_id=constellation_id,
            task_name=task_name,
            request=request,
            state=SessionState.RUNNING,
            created_at=now,
            started_at=now,
            owner_id=owner,
        )
        with self._lock:
            live = self._live.get(session_id)
            if live is not None:
                if live.owner_id != owner:
                    raise SessionError(f"session_id '{session_id}' is owned by another client")
                raise SessionError(f"session_id '{session_id}' is already running")
            if track_for_device:
                try:
                    position = self._registry.admit_session(device_id, session_id)
                except QueueFull as exc:
                    self._record_refused(session, str(exc))
                    raise
                if position:
                    session.state, session.started_at = SessionState.PENDING, None
                    session.queue_position = position
            self._live[session_id] = session
        if constellation_id is not None:
            self._registry.add_constellation_session(constellation_id, session_id)
        if track_for_device:
            self._registry.add_device_session(device_id, session_id)
        if self._store is not None:
            self._store.record_session_created(
                id=session.id,
                session_id=session_id,
                task_name=task_name,
                request=request,
                origin=origin,
                constellation_id=constellation_id,
                device_id=device_id,
                mode=mode,
                state=session.state,
                at=now,
            )
        # DEBUG: the sessions table is the audit trail, and one INFO line per session (its end,
        # below) is what an operator reads; a second one cost ~5% of relay CPU.
        logger.debug(
            "session started session_id=%s device_id=%s origin=%s mode=%s",
            session_id,
            device_id,
            origin.value,
            mode.value,
        )
        return session

    def _record_refused(self, session: LiveSession, error: str) -> None:
        """A session refused for a full queue: one failed row (`queue_full`), so the history
        shows what was asked and why it did not run."""
        if self._store is not None:
            self._store.record_session_created(
                id=session.id,
                session_id=session.session_id,
                task_name=session.task_name,
                request=session.request,
                origin=session.origin,
                constellation_id=session.constellation_id,
                device_id=session.device_id,
                mode=session.mode,
                state=SessionState.PENDING,
                at=session.created_at or self._clock(),
            )
            self._store.record_session_ended(
                id=session.id,
                state=SessionState.FAILED,
                reason=SessionReason.QUEUE_FULL,
                result=None,
                error=error,
                at=session.created_at or self._clock(),
            )

    def get(self, session_id: str) -> LiveSession | None:
        with self._lock:
            return self._live.get(session_id)

    def ended_recently_on(self, session_id: str, device_id: str) -> bool:
        """Whether `session_id` ended lately on `device_id` (a late answer, not a forgery)."""
        with self._lock:
            return self._ended.get(session_id) == device_id

    def live_sessions(self) -> list[LiveSession]:
        with self._lock:
            return list(self._live.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def finish(
        self,
        session_id: str,
        state: SessionState,
        *,
        reason: SessionReason | None = None,
        result: Any = None,
        error: str | None = None,
        run_id: str | None = None,
    ) -> EndedSession | None:
        """End a live session once. Returns None if it had already ended (idempotent).

        With `run_id`, only that run is ended, so a late call for an earlier run that reused the
        same wire id cannot end the current one.
        """
        if state not in FINISHED_STATES:
            raise ValueError(f"{state} is not a final state")
        with self._lock:
            session = self._live.get(session_id)
            if session is None or (run_id is not None and session.id != run_id):
                return None
            del self._live[session_id]
            self._ended[session_id] = session.device_id
            self._ended.move_to_end(session_id)
            if len(self._ended) > RECENTLY_ENDED:
                self._ended.popitem(last=False)
        session.state = state
        ended_at = self._clock()
        self._registry.remove_session(session_id)
        if self._store is not None:
            self._store.record_session_ended(
                id=session.id, state=state, reason=reason, result=result, error=error, at=ended_at
            )
        started = self._start_queued(self._registry.release_session(session_id), ended_at)
        logger.info(
            "session ended session_id=%s state=%s reason=%s device_id=%s origin=%s mode=%s "
            "seconds=%.3f",
            session_id,
            state.value,
            reason,
            session.device_id,
            session.origin.value,
            session.mode.value,
            (ended_at - (session.created_at or ended_at)).total_seconds(),
        )
        return EndedSession(session, state, reason, result, error, ended_at, started)

    def _start_queued(self, session_ids: list[str], at: datetime) -> list[LiveSession]:
        """Pending sessions given a slot: running from `at` (queued for the database)."""
        started = []
        for session_id in session_ids:
            with self._lock:
                session = self._live.get(session_id)
            if session is None or session.state is not SessionState.PENDING:
                continue
            session.state, session.started_at = SessionState.RUNNING, at
            if self._store is not None:
                self._store.record_session_started(id=session.id, at=at)
            logger.debug("queued session started session_id=%s", session_id)
            started.append(session)
        return started

    def complete(self, session_id: str, result: Any = None) -> EndedSession | None:
        return self.finish(session_id, SessionState.COMPLETED, result=result)

    def fail(
        self,
        session_id: str,
        *,
        error: str,
        reason: SessionReason | None = None,
        result: Any = None,
    ) -> EndedSession | None:
        return self.finish(
            session_id, SessionState.FAILED, reason=reason, error=error, result=result
        )

    def cancel_task(self, session_id: str, reason: SessionReason) -> EndedSession | None:
        """Cancel a session (UFO's name for it). Safe to call for an ended or unknown session."""
        return self.finish(session_id, SessionState.CANCELLED, reason=reason)
