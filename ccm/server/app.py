"""create_app(settings): the FastAPI app and its lifespan.

Startup: open the store (SQLite is migrated on its own; Postgres must already be at head), close
what a previous process left open, start the writer and the periodic cleanup job. Shutdown: end
live sessions, close every WebSocket with 1001 recording `server_shutdown`, flush the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import start_http_server
from starlette.routing import WebSocketRoute

from ccm import __version__
from ccm.clock import utcnow
from ccm.config import Settings
from ccm.devices import DeviceConfigs
from ccm.errors import CcmError
from ccm.maintenance import run_cleanup
from ccm.metrics import Metrics
from ccm.registry import ClientConnectionManager
from ccm.server.api import router as api_router
from ccm.server.auth import LocalOnlyGuard, is_loopback_bind, resolve_api_key
from ccm.server.dashboard import router as dashboard_router
from ccm.server.feed import DashboardFeed
from ccm.server.hub import Hub
from ccm.server.runners import SessionRunner, ToolPlanRunner, load_runner
from ccm.server.ws import websocket_endpoint
from ccm.sessions import SessionManager
from ccm.store import Store, open_store
from ccm.store.migrate import ensure_schema

logger = logging.getLogger(__name__)


async def _cleanup_loop(store: Store, settings: Settings, metrics: Metrics) -> None:
    """Run the retention job every `cleanup.interval`, in a worker thread."""
    interval = settings.cleanup.interval.total_seconds()
    while True:
        await asyncio.sleep(interval)
        now = utcnow()
        try:
            report = await asyncio.to_thread(
                run_cleanup,
                store.engine,
                sessions_before=now - settings.cleanup.finished_before,
                connections_before=now - settings.cleanup.connections_retention,
                batch_size=settings.cleanup.batch_size,
            )
            metrics.cleanup_runs.inc()
            metrics.cleanup_rows.labels("sessions").inc(report.sessions_deleted)
            metrics.cleanup_rows.labels("connections").inc(report.connections_deleted)
            logger.info(
                "scheduled cleanup sessions=%d connections=%d",
                report.sessions_deleted,
                report.connections_deleted,
            )
        except Exception:
            logger.exception("scheduled cleanup failed; will try again in %.0f s", interval)


async def _start_store(settings: Settings, metrics: Metrics) -> Store:
    """Open the store: schema check (SQLite migrated), restart recovery, run row, writer."""
    store = open_store(settings)
    await asyncio.to_thread(ensure_schema, store.engine)
    recovered = await asyncio.to_thread(store.recover_after_restart)
    if recovered.connections_closed or recovered.sessions_interrupted:
        logger.warning(
            "restart recovery closed %d connections, interrupted %d sessions",
            recovered.connections_closed,
            recovered.sessions_interrupted,
        )
    await asyncio.to_thread(store.record_run_started, version=__version__)
    store.writer.on_commit = metrics.observe_commit
    store.writer.start()
    return store


def create_app(
    settings: Settings,
    *,
    runners: list[SessionRunner] | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """Build the app. Nothing is opened until the lifespan starts."""
    if runners is None:
        runners = [ToolPlanRunner()]
        if settings.server.agent_runner:
            runners.append(load_runner(settings.server.agent_runner))
    key = api_key or resolve_api_key(settings)[0]
    device_configs = DeviceConfigs(settings.device_config)  # a bad file fails here, at start
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # database.enabled false: no store at all (live registry only, see DatabaseSettings).
        store = await _start_store(settings, metrics) if settings.database.enabled else None
        registry = ClientConnectionManager(
            store=store,
            device_configs=device_configs,
            duplicate_policy=settings.duplicate_policy,
        )
        sessions = SessionManager(registry)
        hub = Hub(
            settings=settings,
            registry=registry,
            sessions=sessions,
            runners=runners,
            metrics=metrics,
        )
        metrics.watch(registry, store.writer if store is not None else None)
        metrics_server = None
        if settings.metrics.enabled and settings.metrics.port is not None:
            metrics_server, _ = start_http_server(
                settings.metrics.port, settings.metrics.host, registry=metrics.registry
            )
        app.state.store = store
        app.state.registry = registry
        app.state.sessions = sessions
        app.state.hub = hub
        dashboard = DashboardFeed(hub=hub, store=store, metrics=metrics)
        dashboard.start()
        app.state.dashboard = dashboard
        cleanup_task = (
            asyncio.create_task(_cleanup_loop(store, settings, metrics), name="ccm-cleanup")
            if settings.cleanup.enabled and store is not None
            else None
        )
        if store is None:
            logger.warning("ccm started without a database (database.enabled: false): no history")
        else:
            logger.info(
                "ccm started run_id=%s database=%s",
                store.run_id,
                store.engine.url.render_as_string(hide_password=True),
            )
        try:
            yield
        finally:
            if cleanup_task is not None:
                cleanup_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cleanup_task
            await dashboard.stop()
            await hub.shutdown()
            if metrics_server is not None:
                metrics_server.shutdown()
            if store is not None:
                store.record_run_stopped()
                drained = await asyncio.to_thread(store.writer.stop)
                store.engine.dispose()
                logger.info("ccm stopped run_id=%s writes_flushed=%s", store.run_id, drained)

    app = FastAPI(
        title="ccm",
        version=__version__,
        description="Client Connection Manager: live registry and SQL history for AIP clients.",
        lifespan=lifespan,
    )
    app.state.api_key = key
    app.state.settings = settings
    app.state.metrics = metrics
    # /ws first, as a plain Starlette route: every connection is matched against the routes
    # in order, and the endpoint takes the WebSocket itself (no FastAPI dependency solving).
    app.router.routes.insert(0, WebSocketRoute("/ws", websocket_endpoint))
    app.include_router(api_router)
    app.include_router(dashboard_router)

    @app.exception_handler(CcmError)
    async def _ccm_error(_request: Request, exc: CcmError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    if is_loopback_bind(settings.server.host):
        app.add_middleware(LocalOnlyGuard, allowed_hosts=settings.server.allowed_hosts)
    return app
