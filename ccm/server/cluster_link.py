"""ClusterLink: this node's part in a cluster of nodes on one PostgreSQL database.

Where sessions live: a session is owned, run and persisted by the node of its **device** (the
device's node keeps relay TASKs and COMMAND rounds local), and its row names that node. A
constellation on another node is a RemoteRequester there: its ACK, refusals and TASK_END go to
its node over the bus, in the same transaction as the session's writes. The requester's node
remembers which node runs each of its constellations' sessions, to tell that node when the
constellation leaves, and to tell the constellation when that node dies.

Identity is the database's: a REGISTER claims its id (one open connection per id, the partial
unique index decides), so two nodes cannot both accept one id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ccm.client_info import ClientInfo
from ccm.cluster.bus import PostgresBus
from ccm.cluster.directory import RemoteClient, RemoteDirectory
from ccm.cluster.lease import NodeLease
from ccm.cluster.messages import (
    DeliverPayload,
    DispatchResultPayload,
    Message,
    MessageKind,
    StartSessionPayload,
)
from ccm.domain import ClientType
from ccm.errors import DATABASE_AWAY, NodeFenced, WriteRefused, first_line
from ccm.ids import new_id
from ccm.store import Store
from ccm.store.claims import Claim, claim
from ccm.store.repository import json_safe
from ccm.store.writes import ConnectParams, CustomWrite


class Handler(Protocol):
    def handle(self, message: Message) -> None: ...


logger = logging.getLogger(__name__)

_TASK_END_PREFIX = '{"type":"task_end",'


@dataclass(eq=False, slots=True)
class RemoteRequester:
    """A constellation connected to another node, as this node's sessions see it."""

    client_id: str
    node: str
    link: ClusterLink
    client_type: ClientType = ClientType.CONSTELLATION

    @property
    def is_constellation(self) -> bool:
        return True

    def send(self, frame: str) -> bool:
        self.link.deliver(self.node, self.client_id, frame)
        return True


@dataclass(frozen=True, slots=True)
class DispatchAnswer:
    status: int
    session_id: str | None = None
    task_name: str | None = None
    error: str | None = None
    queue_position: int = 0
    """Its place in the device's queue (the device is at capacity); 0: it runs."""


class ClusterLink:
    def __init__(
        self,
        store: Store,
        *,
        lease: float,
        ack_timeout: float,
        on_fenced: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.ack_timeout = ack_timeout
        self.handlers: Handler | None = None
        self.bus = PostgresBus(
            store, on_message=self._on_message, on_directory_change=self._on_directory_change
        )
        self.directory = RemoteDirectory(store.engine, me=store.run_id)
        self.lease = NodeLease(
            store.engine,
            run_id=lambda: store.run_id,
            lease=lease,
            on_fenced=on_fenced,
            writes_refused=lambda: store.writer.fenced,
            others_alive=lambda: any(run != store.run_id for run in self.directory.nodes),
        )
        self._remote_sessions: dict[str, dict[str, str]] = {}
        """Sessions of this node's constellations that run on other nodes: client id ->
        {session id: run id}."""
        self._waiting: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        """Answers awaited from other nodes (dispatch results, probe results), by correlation:
        (the node asked, its answer)."""
        self._settling: set[asyncio.Task[None]] = set()
        """Claims of registrations accepted while the database was away."""

    @property
    def me(self) -> str:
        return self.store.run_id

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, name: str, address: str, version: str) -> None:
        """Join: this run's row and lease, reaping what expired; listen; read the others."""
        self.store.writer.hooks = self.bus
        await self.lease.join(name=name, address=address, version=version)
        self.bus.start()
        async with asyncio.timeout(self.ack_timeout * 3):
            await self.bus.wait_listening()
        await self.directory.refresh(None)
        self.directory.start()
        self.lease.start()

    async def stop_tasks(self) -> None:
        await self.lease.stop()
        await self.directory.stop()
        await self.bus.stop()

    async def leave(self) -> None:
        """After the writer's last batch: out of the nodes table at once."""
        await self.lease.leave()

    async def rejoin(self, *, name: str, address: str, version: str) -> None:
        """After fencing: a new run id, a new lease, this node's inbox listened to again."""
        self.store.run_id = new_id()
        self.store.writer.unfence()
        self.directory.me = self.store.run_id
        self._remote_sessions.clear()
        await self.lease.join(name=name, address=address, version=version)
        self.bus.rejoined()
        await self.directory.refresh(None)

    # -- sending --------------------------------------------------------------------------------

    def deliver(self, node: str, client_id: str, frame: str) -> None:
        """A frame for a client of another node (queued with the writer's next batch); dropped
        if that node was declared dead (its survivors told its clients)."""
        if node in self.directory.dead:
            return
        ends = None
        if frame.startswith(_TASK_END_PREFIX):
            ends = json.loads(frame).get("session_id")
        payload = DeliverPayload(client_id=client_id, frame=frame, ends_session=ends)
        self.bus.send(node, MessageKind.DELIVER, payload)

    def send(self, node: str, kind: MessageKind, payload: Any) -> None:
        self.bus.send(node, kind, payload)

    async def request(self, node: str, kind: MessageKind, payload: Any, within: float) -> Any:
        """Send a message that carries `payload["correlation"]` and await its answer."""
        correlation = payload["correlation"]
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = (node, answer)
        try:
            self.bus.send(node, kind, payload)
            async with asyncio.timeout(within):
                return await answer
        finally:
            self._waiting.pop(correlation, None)

    def answer(self, correlation: str, value: Any) -> None:
        waiting = self._waiting.get(correlation)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(value)

    def abandon_requests(self, node: str) -> None:
        """Node `node` was declared dead: what was asked of it will not be answered, so the
        askers time out now instead of after their whole wait."""
        for asked, answer in self._waiting.values():
            if asked == node and not answer.done():
                answer.set_exception(TimeoutError(f"node {node} was declared dead"))

    # -- where clients are ----------------------------------------------------------------------

    async def locate(self, client_id: str) -> RemoteClient | None:
        """The client's connection on another alive node: from memory, else the database."""
        found = self.directory.locate(client_id)
        if found is not None:
            return found
        try:
            return await self.directory.lookup(client_id)
        except DATABASE_AWAY as exc:  # not found: the caller says so
            logger.warning("cannot look up client_id=%s: %s", client_id, first_line(exc))
            return None

    # -- remote sessions of this node's constellations ------------------------------------------

    def track(self, client_id: str, session_id: str, run_id: str) -> None:
        self._remote_sessions.setdefault(client_id, {})[session_id] = run_id

    def untrack(self, client_id: str, session_id: str) -> None:
        sessions = self._remote_sessions.get(client_id)
        if sessions is not None:
            sessions.pop(session_id, None)
            if not sessions:
                del self._remote_sessions[client_id]

    def remote_sessions(self, client_id: str) -> dict[str, str]:
        return dict(self._remote_sessions.get(client_id, {}))

    def remote_sessions_on(self, run_id: str) -> list[tuple[str, str]]:
        """(client id, session id) of the sessions this node's constellations run on `run_id`."""
        return [
            (client_id, session_id)
            for client_id, sessions in self._remote_sessions.items()
            for session_id, node in sessions.items()
            if node == run_id
        ]

    def forget_requester(self, client_id: str) -> dict[str, str]:
        return self._remote_sessions.pop(client_id, {})

    # -- registration ---------------------------------------------------------------------------

    async def claim(
        self,
        info: ClientInfo,
        *,
        takeover: bool,
        on_lost: Callable[[], Awaitable[None]],
        on_replaced: Callable[[Claim], None],
    ) -> Claim | None:
        """Claim `info.client_id` for `info.connection_id` in the database (one group commit).

        None when the database is away (known, or it did not confirm within the ACK timeout):
        the registration goes on, as on a single node, and the claim settles when the database
        is back; if the id turned out to be held elsewhere, `on_lost` closes this connection
        then. Raises NodeFenced if this node was declared dead, WriteRefused if the database
        refused the claim's row."""
        outcome = self._queue_claim(info, takeover=takeover)
        writer = self.store.writer
        committed = asyncio.ensure_future(writer.durable())
        if not writer.degraded:
            try:
                async with asyncio.timeout(self.ack_timeout):
                    await asyncio.shield(committed)
            except TimeoutError:
                pass
            else:
                if not outcome:  # committed around it: the database refused this write
                    raise WriteRefused(f"the claim of {info.client_id!r} was refused")
                return outcome[0]

        async def settle() -> None:
            try:
                await committed
            except NodeFenced:
                return  # the node was declared dead meanwhile: fencing closes everything
            if outcome and outcome[0].claimed:
                on_replaced(outcome[0])
            else:
                await on_lost()

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return None

    def _queue_claim(self, info: ClientInfo, *, takeover: bool) -> list[Claim]:
        """Queue the claim write; the list gets its outcome when the batch is applied."""
        params = ConnectParams(
            p_connection_id=info.connection_id,
            p_client_id=info.client_id,
            p_client_type=info.client_type.value,
            p_platform=info.platform,
            p_metadata=json_safe(info.metadata),
            p_system_info=json_safe(info.system_info),
            p_remote_address=info.remote_address,
            p_server_run_id=self.me,
            p_at=info.connected_at,
        )
        outcome: list[Claim] = []

        def apply(conn: Any) -> None:
            outcome[:] = [claim(conn, params, takeover=takeover)]

        about = f"client_id={info.client_id!r} connection_id={info.connection_id!r}"
        self.store.writer.submit(CustomWrite("claim", apply, about=about))
        return outcome

    async def dispatch(
        self, device: RemoteClient, request: str, task_name: str | None
    ) -> DispatchAnswer:
        """HTTP dispatch to a device on another node; its node answers when the session runs."""
        payload = StartSessionPayload(
            device_id=device.client_id,
            origin="http",
            request=request,
            task_name=task_name,
            session_id=None,
            requester_id=None,
            correlation=new_id(),
        )
        try:
            result: DispatchResultPayload = await self.request(
                device.run_id, MessageKind.START_SESSION, payload, self.ack_timeout * 3
            )
        except TimeoutError:
            return DispatchAnswer(503, error="the device's node did not answer in time; try again")
        return DispatchAnswer(
            result["status"],
            result["session_id"],
            result["task_name"],
            result["error"],
            result.get("queue_position", 0),
        )

    # -- receiving ------------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        if self.handlers is not None:
            self.handlers.handle(message)

    def _on_directory_change(self, run_id: str) -> None:
        self.directory.mark_dirty(run_id)
