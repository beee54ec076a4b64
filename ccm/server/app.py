"""create_app(settings, api_key=...): the FastAPI app, its routes, and a lifespan that starts
and stops the Runtime (ccm.server.runtime), which owns everything the app opens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ccm.config import Settings
from ccm.devices import DeviceConfigs
from ccm.errors import CcmError, HistoryUnavailable
from ccm.metrics import Metrics
from ccm.server.api import history_unavailable
from ccm.server.api import router as api_router
from ccm.server.auth import KeyRing, LocalOnlyGuard, is_loopback_bind
from ccm.server.dashboard import router as dashboard_router
from ccm.server.docs import install_docs
from ccm.server.history import HistoryReads
from ccm.server.limits import ConnectionGate
from ccm.server.runners import SessionRunner, ToolPlanRunner, load_runner
from ccm.server.runtime import Runtime
from ccm.server.ws import WebSocketEndpoint
from ccm.server.ws_probe import KeepTransport
from ccm.version import VERSION

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    api_key: str | KeyRing,
    runners: list[SessionRunner] | None = None,
) -> FastAPI:
    """Build the app. Nothing is opened or written until the lifespan starts (the caller
    resolves the API keys: `ccm.server.auth.key_ring` may create the key file). `api_key` is
    one key, or the KeyRing of the settings' keys (the key file read again when it changes)."""
    if runners is None:
        runners = [ToolPlanRunner()]
        if settings.server.agent_runner:
            runners.append(load_runner(settings.server.agent_runner))
    keys = api_key if isinstance(api_key, KeyRing) else KeyRing([api_key])
    device_configs = DeviceConfigs(settings.device_config)  # a bad file fails here, at start
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(
            settings, metrics=metrics, device_configs=device_configs, runners=runners
        )
        app.state.runtime = runtime
        app.state.store = runtime.store
        app.state.registry = runtime.registry
        app.state.sessions = runtime.sessions
        app.state.hub = runtime.hub
        app.state.dashboard = runtime.dashboard
        try:
            yield
        finally:
            await runtime.shutdown()

    app = FastAPI(
        title="ccm",
        version=VERSION,
        description="Client Connection Manager: live registry and SQL history for AIP clients.",
        lifespan=lifespan,
        openapi_url=None,  # install_docs serves it as server.docs says
    )
    app.state.keys = keys
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.history = HistoryReads(settings.limits)  # bounded SQL reads for the HTTP API
    app.state.connections = ConnectionGate(settings.limits)  # pending connections, descriptors
    app.add_exception_handler(HistoryUnavailable, history_unavailable)  # 503, not CcmError's 400
    app.include_router(api_router)
    app.include_router(dashboard_router)
    install_docs(app, settings.server.docs)

    @app.exception_handler(CcmError)
    async def _ccm_error(_request: Request, exc: CcmError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    app.add_middleware(WebSocketEndpoint)  # added first: innermost, /ws past the router
    if is_loopback_bind(settings.server.host):
        app.add_middleware(LocalOnlyGuard, allowed_hosts=settings.server.allowed_hosts)
    app.add_middleware(KeepTransport)  # added last: outermost, sees uvicorn's own send
    return app
