"""RemoteDirectory: this node's view of the clients connected to the other nodes, and of the
nodes themselves, kept in memory so that the cluster-wide HTTP routes and cross-node routing
are dict lookups.

It is refreshed from the database: a node's rows are read again when that node NOTIFYs that its
connections changed (at most every `debounce` seconds), and everything every `every` seconds in
case a notification was lost. A client just registered elsewhere may be missing for that long;
routing then asks the database directly (`lookup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from ccm.domain import ClientType
from ccm.errors import DATABASE_AWAY, first_line
from ccm.store.models import clients, connections, server_runs
from ccm.store.nodes import ALIVE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RemoteClient:
    client_id: str
    client_type: ClientType
    platform: str | None
    system_info: dict[str, Any] | None
    connected_at: datetime
    connection_id: str
    run_id: str


@dataclass(frozen=True, slots=True)
class RemoteNode:
    run_id: str
    name: str | None
    address: str | None


def _query(engine: Engine, run_ids: list[str] | None, client_id: str | None) -> list[RemoteClient]:
    query = (
        select(
            connections.c.client_id,
            connections.c.client_type,
            clients.c.platform,
            clients.c.system_info,
            connections.c.connected_at,
            connections.c.connection_id,
            connections.c.server_run_id,
        )
        .select_from(
            connections.join(clients, clients.c.client_id == connections.c.client_id).join(
                server_runs, server_runs.c.run_id == connections.c.server_run_id
            )
        )
        .where(
            connections.c.disconnected_at.is_(None),
            server_runs.c.state == ALIVE,
            server_runs.c.lease_until > func.now(),
        )
        .order_by(connections.c.connected_at)
    )
    if run_ids is not None:
        query = query.where(connections.c.server_run_id.in_(run_ids))
    if client_id is not None:
        query = query.where(connections.c.client_id == client_id)
    with engine.connect() as conn:
        return [
            RemoteClient(
                client_id=row[0],
                client_type=ClientType(row[1]),
                platform=row[2],
                system_info=row[3] if isinstance(row[3], dict) else None,
                connected_at=row[4],
                connection_id=row[5],
                run_id=row[6] or "",
            )
            for row in conn.execute(query)
        ]


def _alive_nodes(engine: Engine) -> dict[str, RemoteNode]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(server_runs.c.run_id, server_runs.c.name, server_runs.c.address).where(
                server_runs.c.state == ALIVE, server_runs.c.lease_until > func.now()
            )
        )
        return {row[0]: RemoteNode(row[0], row[1], row[2]) for row in rows}


class RemoteDirectory:
    def __init__(
        self, engine: Engine, *, me: str, debounce: float = 0.25, every: float = 5.0
    ) -> None:
        self._engine = engine
        self.me = me
        self._debounce = debounce
        self._every = every
        self.nodes: dict[str, RemoteNode] = {}
        """Alive nodes, this one included."""
        self._by_node: dict[str, dict[str, RemoteClient]] = {}
        self._clients: dict[str, RemoteClient] = {}
        self._dirty: set[str] = set()
        self.dead: set[str] = set()
        """Runs declared dead while this node watched: nothing is sent to them any more."""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- queries (memory) -----------------------------------------------------------------------

    def locate(self, client_id: str) -> RemoteClient | None:
        """The client's connection on another alive node, as last read."""
        client = self._clients.get(client_id)
        if client is None or client.run_id not in self.nodes:
            return None
        return client

    def clients(self) -> list[RemoteClient]:
        """Every client connected to another alive node, oldest connection first."""
        alive = self.nodes
        return sorted(
            (c for c in self._clients.values() if c.run_id in alive), key=lambda c: c.connected_at
        )

    def is_alive(self, run_id: str) -> bool:
        return run_id in self.nodes

    # -- the database ---------------------------------------------------------------------------

    async def lookup(self, client_id: str) -> RemoteClient | None:
        """Ask the database where `client_id` is connected now (a miss in memory)."""
        found = await asyncio.to_thread(_query, self._engine, None, client_id)
        client = found[0] if found and found[0].run_id != self.me else None
        if client is not None:
            self._put(client)
        return client

    def mark_dirty(self, run_id: str) -> None:
        """Node `run_id` said its connections changed."""
        self._dirty.add(run_id)
        self._changed.set()

    def forget_node(self, run_id: str) -> None:
        """A node was declared dead: its clients are gone at once."""
        self.dead.add(run_id)
        self.nodes.pop(run_id, None)
        for client_id in self._by_node.pop(run_id, {}):
            if self._clients.get(client_id, None) and self._clients[client_id].run_id == run_id:
                del self._clients[client_id]

    async def refresh(self, run_ids: set[str] | None = None) -> None:
        """Read the alive nodes, and the clients of `run_ids` (None: of every other node)."""
        self.nodes = await asyncio.to_thread(_alive_nodes, self._engine)
        wanted = None if run_ids is None else sorted(run_ids - {self.me})
        if wanted == []:
            return
        rows = await asyncio.to_thread(_query, self._engine, wanted, None)
        stale = set(self._by_node) if wanted is None else set(wanted)
        for run_id in stale:
            for client_id in self._by_node.pop(run_id, {}):
                if (held := self._clients.get(client_id)) is not None and held.run_id == run_id:
                    del self._clients[client_id]
        for client in rows:
            if client.run_id != self.me:
                self._put(client)
        for run_id in list(self._by_node):
            if run_id not in self.nodes:
                self.forget_node(run_id)

    def _put(self, client: RemoteClient) -> None:
        old = self._clients.get(client.client_id)
        if old is not None and old.run_id != client.run_id:
            self._by_node.get(old.run_id, {}).pop(client.client_id, None)
        self._clients[client.client_id] = client
        self._by_node.setdefault(client.run_id, {})[client.client_id] = client

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ccm-directory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        full_due = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._every):
                    await self._changed.wait()
            await asyncio.sleep(self._debounce)  # one read for a burst of registrations
            self._changed.clear()
            dirty, self._dirty = self._dirty, set()
            full = loop.time() >= full_due
            try:
                await self.refresh(None if full else dirty)
            except DATABASE_AWAY as exc:  # keep the last view, retry
                logger.warning("cluster directory not refreshed: %s", first_line(exc))
                self._dirty |= dirty
                continue
            if full:
                full_due = loop.time() + self._every
