"""Runtime: the app-lifetime objects, built in order at start and closed in reverse at stop.

It owns the store, the live registry, the sessions, the hub, the dashboard feed and the
background jobs, and it is the one owner of the shutdown sequence, which runs in uvicorn's
order: stop accepting (the server's listening sockets, closed by `CcmServer` before it calls
`close_connections`), end live sessions and close each connection with 1001 within a timeout,
let in-flight requests finish (uvicorn), then stop the jobs and flush the writer (`close`).
Under a plain uvicorn, the lifespan's exit runs the whole sequence through `shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from ccm.clock import utcnow
from ccm.config import Settings
from ccm.device_load import CapacityPolicy
from ccm.devices import DeviceConfigs
from ccm.domain import DisconnectReason, SessionReason, SessionState
from ccm.errors import DATABASE_AWAY, NodeFenced, first_line
from ccm.maintenance import run_cleanup
from ccm.metrics import Metrics
from ccm.protocol import CLOSE_SERVICE_RESTART
from ccm.registry import ClientConnectionManager
from ccm.server.cluster_link import ClusterLink
from ccm.server.cluster_messages import MessageHandlers
from ccm.server.feed import DashboardFeed
from ccm.server.hub import Hub
from ccm.server.runners import SessionRunner
from ccm.sessions import SessionManager
from ccm.store import Store, open_store
from ccm.store.exclusive import hold_sqlite_file, release_sqlite_file
from ccm.store.migrate import ensure_schema
from ccm.version import VERSION

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Runtime:
    settings: Settings
    metrics: Metrics
    store: Store | None
    registry: ClientConnectionManager
    sessions: SessionManager
    hub: Hub
    dashboard: DashboardFeed
    cluster: ClusterLink | None = None
    _jobs: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: WSGIServer | None = None
    _connections_closed: bool = False
    _closed: bool = False

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        metrics: Metrics,
        device_configs: DeviceConfigs,
        runners: list[SessionRunner],
    ) -> Runtime:
        # database.enabled false: no store at all (live registry only, see DatabaseSettings).
        store = None
        if settings.database.enabled:
            hold_sqlite_file(settings.database_url)  # one server per SQLite file: refuse early
            store = await _open_store(settings, metrics)
        registry = ClientConnectionManager(
            store=store,
            device_configs=device_configs,
            duplicate_policy=settings.duplicate_policy,
            capacity=CapacityPolicy.from_settings(settings.dispatch),
        )
        sessions = SessionManager(registry, store=store)
        hub = Hub(
            settings=settings,
            registry=registry,
            sessions=sessions,
            runners=runners,
            store=store,
            metrics=metrics,
        )
        metrics.watch(registry, store.writer if store is not None else None)
        runtime = cls(
            settings=settings,
            metrics=metrics,
            store=store,
            registry=registry,
            sessions=sessions,
            hub=hub,
            dashboard=DashboardFeed(hub=hub, store=store, metrics=metrics),
        )
        if store is not None and store.engine.dialect.name == "postgresql":
            await runtime._join_cluster(store)
        runtime._start_jobs()
        if store is None:
            logger.warning("ccm started without a database (database.enabled: false): no history")
        else:
            url = store.engine.url.render_as_string(hide_password=True)
            logger.info("ccm started run_id=%s database=%s", store.run_id, url)
        return runtime

    def _identity(self) -> dict[str, str]:
        server, cluster = self.settings.server, self.settings.cluster
        address = cluster.advertise_address or f"{server.host}:{server.port}"
        return {
            "name": cluster.node_name or f"{socket.gethostname()}:{server.port}",
            "address": address,
            "version": VERSION,
        }

    async def _join_cluster(self, store: Store) -> None:
        """Nodes on one PostgreSQL database are one cluster (a cluster of one is one too)."""
        cluster = ClusterLink(
            store,
            lease=self.settings.cluster.lease.total_seconds(),
            ack_timeout=self.hub.orchestrator.ack_timeout,
            on_fenced=self._fenced,
        )
        cluster.handlers = MessageHandlers(link=cluster, hub=self.hub)
        self.hub.attach(cluster)
        self.cluster = cluster
        await cluster.start(**self._identity())
        logger.info(
            "node joined the cluster run_id=%s nodes=%d", store.run_id, len(cluster.directory.nodes)
        )

    async def _fenced(self) -> None:
        """This node's lease ran out: the others have (or will have) declared it dead and told
        the parties of its sessions. Close every connection, drop what it had queued, and rejoin
        as a new node."""
        assert self.store is not None
        assert self.cluster is not None
        error = NodeFenced("this node's lease ran out; it rejoined the cluster as a new node")
        await self.hub.orchestrator.interrupt_all(
            SessionState.FAILED, SessionReason.NODE_LOST, "this node lost its lease"
        )
        await self.hub.close_connections(DisconnectReason.NODE_FENCED, CLOSE_SERVICE_RESTART)
        await self.hub.orchestrator.cancel_held()
        dropped = self.store.writer.discard(error)
        logger.warning("fenced: %d queued writes dropped", dropped)
        while True:
            try:
                await self.cluster.rejoin(**self._identity())
            except DATABASE_AWAY as exc:  # still away: try again
                logger.warning(
                    "rejoining the cluster failed (%s); retrying in 1 s", first_line(exc)
                )
                await asyncio.sleep(1.0)
                continue
            logger.warning("rejoined the cluster run_id=%s", self.store.run_id)
            return

    def _start_jobs(self) -> None:
        settings = self.settings
        if settings.metrics.enabled and settings.metrics.port is not None:
            self._metrics_server, _ = start_http_server(
                settings.metrics.port, settings.metrics.host, registry=self.metrics.registry
            )
        self.dashboard.start()
        store = self.store
        if store is None:
            return
        self._jobs.append(asyncio.create_task(self._flush_last_seen(store), name="ccm-last-seen"))
        if settings.cleanup.enabled:
            self._jobs.append(asyncio.create_task(self._cleanup(store), name="ccm-cleanup"))

    # -- shutdown, in order ---------------------------------------------------------------------

    async def close_connections(self) -> None:
        """Steps 2 and 3: live sessions end `interrupted` (owners told), then every connection
        is closed with 1001 and recorded as `server_shutdown`. Idempotent."""
        if self._connections_closed:
            return
        self._connections_closed = True
        self.dashboard.close()  # end event streams: uvicorn's drain would wait for open pages
        orchestrator = self.hub.orchestrator
        await orchestrator.interrupt_all()
        await self.hub.close_connections()
        await orchestrator.cancel_held()

    async def close(self) -> None:
        """Step 5, once requests are done: stop the jobs, flush the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await job
        if self.cluster is not None:
            await self.cluster.stop_tasks()
        await self.dashboard.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        store = self.store
        if store is not None:
            self._record_last_seen(store)
            if self.cluster is None:
                store.record_run_stopped()
            drained = await asyncio.to_thread(store.writer.stop)
            if self.cluster is not None:
                with contextlib.suppress(*DATABASE_AWAY):  # the lease expires instead
                    await self.cluster.leave()
            store.engine.dispose()
            release_sqlite_file(self.settings.database_url)
            logger.info("ccm stopped run_id=%s writes_flushed=%s", store.run_id, drained)

    async def shutdown(self) -> None:
        """The whole sequence (the lifespan's exit; a no-op for what already ran)."""
        await self.close_connections()
        await self.close()

    # -- background jobs ------------------------------------------------------------------------

    async def _cleanup(self, store: Store) -> None:
        """Run the retention job every `cleanup.interval`, in a worker thread."""
        settings = self.settings.cleanup
        interval = settings.interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            now = utcnow()
            try:
                report = await asyncio.to_thread(
                    run_cleanup,
                    store.engine,
                    sessions_before=now - settings.finished_before,
                    connections_before=now - settings.connections_retention,
                    batch_size=settings.batch_size,
                )
            except Exception:  # the job runs again next interval; the server goes on
                logger.exception("scheduled cleanup failed; will try again in %.0f s", interval)
                continue
            self.metrics.cleanup_runs.inc()
            self.metrics.cleanup_rows.labels("sessions").inc(report.sessions_deleted)
            self.metrics.cleanup_rows.labels("connections").inc(report.connections_deleted)
            logger.info(
                "scheduled cleanup sessions=%d connections=%d",
                report.sessions_deleted,
                report.connections_deleted,
            )

    async def _flush_last_seen(self, store: Store) -> None:
        """Heartbeats are kept in memory; every `server.last_seen_interval` the clients heard
        from since the last flush get `clients.last_seen_at` in SQL, in one batch."""
        interval = self.settings.server.last_seen_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            self._record_last_seen(store)

    def _record_last_seen(self, store: Store) -> None:
        for client_id, connection_id, at in self.registry.take_heard_from():
            store.record_last_seen(client_id=client_id, connection_id=connection_id, at=at)


async def _open_store(settings: Settings, metrics: Metrics) -> Store:
    """Open the store: schema check (SQLite migrated), and on SQLite (one server per file)
    restart recovery and this run's row; a cluster node joins instead (_join_cluster)."""
    store = open_store(settings)
    await asyncio.to_thread(ensure_schema, store.engine)
    if store.engine.dialect.name != "postgresql":
        recovered = await asyncio.to_thread(store.recover_after_restart)
        if recovered.connections_closed or recovered.sessions_interrupted:
            logger.warning(
                "restart recovery closed %d connections, interrupted %d sessions",
                recovered.connections_closed,
                recovered.sessions_interrupted,
            )
        await asyncio.to_thread(store.record_run_started, version=VERSION)
    store.writer.on_commit = metrics.observe_commit
    store.writer.start()
    return store
