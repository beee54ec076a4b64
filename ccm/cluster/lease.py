"""NodeLease: this node's membership of the cluster, and the reaper of the nodes that left it
without a word.

The lease is renewed every third of its length with the database's clock. A node is fenced
(`on_fenced` runs, and it rejoins as a new run) when the database says it was declared dead,
when its writes are refused for that reason, or when no renewal succeeded for a whole lease by
its own monotonic clock (cut off, or paused) while other nodes were alive (counted at its last
renewal, or seen by its directory since): they may have declared it dead. A node that was alone
goes on serving through an outage of the database: nobody can have declared it dead, and its
lease is renewed when the database is back. On every tick the node also reaps the nodes whose
lease ran out, under the cluster-wide advisory lock, so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine

from ccm.clock import utcnow
from ccm.cluster.messages import EndedSessionPayload, MessageKind, NodeDeadPayload
from ccm.errors import DATABASE_AWAY, first_line
from ccm.store import inbox as inbox_sql
from ccm.store import nodes as nodes_sql

logger = logging.getLogger(__name__)


class NodeLease:
    def __init__(
        self,
        engine: Engine,
        *,
        run_id: Callable[[], str],
        lease: float,
        on_fenced: Callable[[], Awaitable[None]],
        writes_refused: Callable[[], bool] = lambda: False,
        others_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self._engine = engine
        self._writes_refused = writes_refused
        self._others_alive = others_alive
        self._run_id = run_id
        self.lease = lease
        self._on_fenced = on_fenced
        self._renewed_at = time.monotonic()
        self._others_at_renewal = 0
        """Other nodes alive at the last renewal: a node cut off after that knows it was not
        alone even if its directory had not seen the newcomer yet."""
        self._task: asyncio.Task[None] | None = None

    async def join(self, *, name: str, address: str, version: str) -> None:
        """Enter the cluster: this run's row, alive; then close what this node's previous
        incarnation left if its process is gone (at once, as `server_restart`: its clients are
        reconnecting here now and must not wait out its lease), reap whatever expired meanwhile
        and what gone nodes left open."""
        await asyncio.to_thread(
            nodes_sql.join,
            self._engine,
            run_id=self._run_id(),
            name=name,
            address=address,
            version=version,
            lease=self.lease,
        )
        self._renewed_at = time.monotonic()
        for run_id in await asyncio.to_thread(
            nodes_sql.previous_incarnations, self._engine, me=self._run_id(), address=address
        ):
            await asyncio.to_thread(self._reap_sync, run_id, nodes_sql.GoneBy.RESTARTED)
        await self.reap_expired()
        for run_id in await asyncio.to_thread(nodes_sql.orphaned_nodes, self._engine):
            await asyncio.to_thread(self._reap_sync, run_id, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ccm-node-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def leave(self) -> None:
        """A clean stop: out of the cluster table at once, nobody waits for the lease."""
        await asyncio.to_thread(nodes_sql.leave, self._engine, self._run_id())

    async def _run(self) -> None:
        interval = self.lease / 3
        tick: asyncio.Future[bool] | None = None
        """The renewal (and reaping) in flight: one at a time, so a database that hangs holds
        one worker thread, not one per tick."""
        while True:
            await asyncio.sleep(interval)
            if tick is None:
                tick = asyncio.ensure_future(asyncio.to_thread(self._tick_sync))
            renewed: bool | None = None
            try:
                async with asyncio.timeout(interval):
                    renewed = await asyncio.shield(tick)
                tick = None
            except TimeoutError:
                pass  # still waiting for the database: the watchdog below decides
            except DATABASE_AWAY as exc:
                logger.warning("lease renewal failed: %s", first_line(exc))
                tick = None
            now = time.monotonic()
            if renewed and not self._writes_refused():
                self._renewed_at = now
            elif (
                renewed
                or renewed is False
                # Cut off for a whole lease: the others may have declared this node dead. A node
                # that was alone has nobody to do that, and goes on serving through the outage.
                or (
                    now - self._renewed_at > self.lease
                    and (self._others_at_renewal > 0 or self._others_alive())
                )
            ):
                logger.error(
                    "node %s lost its lease (%s): closing its connections and rejoining",
                    self._run_id(),
                    "no renewal for a lease"
                    if renewed is None
                    else "expired in the database"
                    if renewed is False
                    else "its writes were refused",
                )
                await self._on_fenced()
                self._renewed_at = time.monotonic()
                tick = None  # a renewal still in flight was for the run that is gone

    def _tick_sync(self) -> bool:
        """Renew the lease; if it still holds, reap the nodes whose lease ran out."""
        others = nodes_sql.renew(self._engine, self._run_id(), self.lease)
        if others is None:
            return False
        self._others_at_renewal = others
        with contextlib.suppress(*DATABASE_AWAY):  # a reap that fails is tried next tick
            for run_id in nodes_sql.expired_nodes(self._engine, me=self._run_id()):
                self._reap_sync(run_id, nodes_sql.GoneBy.LEASE_EXPIRED)
        return True

    async def reap_expired(self) -> None:
        for run_id in await asyncio.to_thread(
            nodes_sql.expired_nodes, self._engine, me=self._run_id()
        ):
            await asyncio.to_thread(self._reap_sync, run_id, nodes_sql.GoneBy.LEASE_EXPIRED)

    def _reap_sync(self, run_id: str, gone_by: nodes_sql.GoneBy | None) -> None:
        """Reap one node in one transaction, with the NODE_DEAD messages to every alive node.
        `gone_by` None: a run already not alive that left rows open (closed as `node_lost`)."""
        with self._engine.begin() as conn:
            if gone_by is None:
                report = nodes_sql.close_holdings(conn, run_id)
            else:
                reaped = nodes_sql.reap(conn, run_id, gone_by=gone_by)
                if reaped is None:
                    return  # another node holds the reaper's lock, or it renewed in time
                report = reaped
            payload = NodeDeadPayload(
                run_id=run_id,
                sessions=[
                    EndedSessionPayload(
                        session_id=s.session_id,
                        constellation_id=s.constellation_id,
                        device_id=s.device_id,
                    )
                    for s in report.sessions
                ],
            )
            targets = nodes_sql.alive_nodes(conn)
            inbox_sql.send_messages(
                conn,
                source=self._run_id(),
                targets=targets,
                kind=MessageKind.NODE_DEAD.value,
                payload=_plain(payload),
                at=utcnow(),
            )
        if report.connections_closed or report.sessions:
            restarted = gone_by is nodes_sql.GoneBy.RESTARTED
            logger.warning(
                "%s %s: %d connections closed (%s), %d sessions ended",
                "closed what was left by this node's previous run" if restarted else "reaped node",
                run_id,
                report.connections_closed,
                "server_restart" if restarted else "node_lost",
                len(report.sessions),
            )


def _plain(payload: NodeDeadPayload) -> dict[str, Any]:
    return {"run_id": payload["run_id"], "sessions": [dict(s) for s in payload["sessions"]]}
