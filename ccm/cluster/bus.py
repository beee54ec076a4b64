"""The bus between nodes: messages through the inbox table, woken by LISTEN/NOTIFY.

Sending queues the message on the store's writer, so it is written in the same transaction as
the writes queued before it: a TASK_END sent to another node exists only if the session's final
state was committed with it. After each batch, one NOTIFY per target node wakes its reader, and
one on the directory channel tells every node this node's connections changed.

Receiving: one connection LISTENs (the listener); on each wake-up, and every `poll` seconds in
case a wake-up was lost, the reader takes every message waiting in this node's inbox, in id
order. After the listener (re)connects it LISTENs first, then reads, so nothing sent while it
was away is missed. `Bus` is the interface the server uses; PostgresBus is the one transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import psycopg
from sqlalchemy import Connection, Engine

from ccm.clock import utcnow
from ccm.cluster.messages import Message, MessageKind
from ccm.errors import DATABASE_AWAY, NodeFenced, first_line
from ccm.store import Store
from ccm.store import inbox as inbox_sql
from ccm.store.claims import is_alive
from ccm.store.engine import POSTGRES_CONNECT_ARGS
from ccm.store.writes import BusMessageParams, CustomWrite, QueuedWrite, Write, WriteKind

logger = logging.getLogger(__name__)

MessageHandler = Callable[[Message], None]
ChangeHandler = Callable[[str], None]

_DIRECTORY_WRITES = {WriteKind.CONNECT, WriteKind.DISCONNECT}
_DIRECTORY_CUSTOM = {"claim", "close_connection"}


class Bus(Protocol):
    """How a node reaches the others."""

    def send(self, target: str, kind: MessageKind, payload: Mapping[str, Any]) -> None:
        """Queue a message for node `target`; it is delivered iff the batch it joins commits."""


class PostgresBus:
    def __init__(
        self,
        store: Store,
        *,
        on_message: MessageHandler,
        on_directory_change: ChangeHandler,
        poll: float = 5.0,
    ) -> None:
        self._store = store
        self._engine: Engine = store.engine
        self._on_message = on_message
        self._on_directory_change = on_directory_change
        self._poll = poll
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def run_id(self) -> str:
        return self._store.run_id

    # -- sending --------------------------------------------------------------------------------

    def send(self, target: str, kind: MessageKind, payload: Mapping[str, Any]) -> None:
        params = BusMessageParams(
            p_target_run_id=target,
            p_source_run_id=self.run_id,
            p_kind=kind.value,
            p_payload=dict(payload),
            p_at=utcnow(),
        )
        self._store.writer.submit(Write(WriteKind.BUS_MESSAGE, params))

    # -- the writer's batch hooks (BatchHooks) --------------------------------------------------

    def before(self, conn: Connection) -> None:
        """Fencing: a batch of a node the cluster declared dead is refused whole."""
        if not is_alive(conn, self.run_id):
            raise NodeFenced(
                f"node {self.run_id} is no longer alive in the cluster (its lease ran out)"
            )

    def after(self, conn: Connection, writes: list[QueuedWrite]) -> None:
        targets: set[str] = set()
        changed = False
        for write in writes:
            if isinstance(write, Write):
                if write.kind == WriteKind.BUS_MESSAGE:
                    targets.add(write.params["p_target_run_id"])
                elif write.kind in _DIRECTORY_WRITES:
                    changed = True
            elif isinstance(write, CustomWrite) and write.name in _DIRECTORY_CUSTOM:
                changed = True
        for target in sorted(targets):
            inbox_sql.notify(conn, inbox_sql.inbox_channel(target))
        if changed:
            inbox_sql.notify(conn, inbox_sql.DIRECTORY_CHANNEL, self.run_id)

    # -- receiving ------------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="ccm-bus-listener"),
            asyncio.create_task(self._read(), name="ccm-bus-reader"),
        ]

    async def wait_listening(self) -> None:
        """Until the listener has LISTENed once (start-up: before this node takes clients)."""
        await self._listening.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def rejoined(self) -> None:
        """The node has a new run id: listen on its inbox (the listener reconnects)."""
        for task in self._tasks[:1]:
            task.cancel()
        self._tasks[:1] = [asyncio.create_task(self._listen(), name="ccm-bus-listener")]

    async def _listen(self) -> None:
        while True:
            channel = inbox_sql.inbox_channel(self.run_id)
            try:
                connection = await psycopg.AsyncConnection.connect(
                    **_libpq_params(self._engine), autocommit=True
                )
            except psycopg.Error as exc:
                logger.warning("bus listener cannot connect, retrying in 1 s: %s", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                async with connection:
                    await connection.execute(f'LISTEN "{channel}"')
                    await connection.execute(f'LISTEN "{inbox_sql.DIRECTORY_CHANNEL}"')
                    self._listening.set()
                    self._wake.set()  # catch-up: read what was sent while we were away
                    async for notice in connection.notifies():
                        if notice.channel == channel:
                            self._wake.set()
                        elif notice.payload and notice.payload != self.run_id:
                            self._on_directory_change(notice.payload)
            except psycopg.Error as exc:
                logger.warning("bus listener lost its connection, reconnecting: %s", exc)
                await asyncio.sleep(0.5)

    async def _read(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()
            self._wake.clear()
            try:
                while True:
                    rows = await asyncio.to_thread(
                        inbox_sql.take_messages, self._engine, self.run_id
                    )
                    for row_id, source, kind, payload in rows:
                        self._dispatch(row_id, source, kind, payload)
                    if len(rows) < inbox_sql.TAKE_LIMIT:
                        break
            except DATABASE_AWAY as exc:  # the next wake-up or poll reads again
                logger.warning("bus reader could not read the inbox: %s", first_line(exc))
                await asyncio.sleep(1.0)

    def _dispatch(self, row_id: int, source: str, kind: str, payload: Any) -> None:
        try:
            message = Message(row_id, source, MessageKind(kind), payload)
        except ValueError:
            logger.error("bus message of unknown kind %r from node %s dropped", kind, source)
            return
        try:
            self._on_message(message)
        except Exception:  # one bad message never stops the bus
            logger.exception("bus message %s from node %s failed", kind, source)


def _libpq_params(engine: Engine) -> dict[str, Any]:
    """psycopg connection parameters for the engine's URL, as SQLAlchemy builds them (so a
    multi-host URL with target_session_attrs works the same for the listener)."""
    _args, params = engine.dialect.create_connect_args(engine.url)
    return {**{k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in params}, **params}
