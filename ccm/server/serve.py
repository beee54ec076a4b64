"""Run the app under uvicorn with our logging, frame limit, transport limits, and a graceful
WebSocket shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from ccm.config import Settings
from ccm.errors import CcmError
from ccm.server.limits import install, raise_open_files_limit

logger = logging.getLogger(__name__)


class CcmServer(uvicorn.Server):
    """uvicorn.Server that closes our WebSockets with 1001 (recorded as `server_shutdown`)
    before uvicorn's own shutdown would close them with its generic code."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_devices)

    def _reload_devices(self) -> None:
        registry = getattr(self._app.state, "registry", None)
        if registry is None:
            return
        try:
            changed = registry.reload_device_config()
            logger.info("device config reloaded (SIGHUP), devices changed=%d", changed)
        except CcmError as exc:
            logger.error("device config reload failed, previous config kept: %s", exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The shutdown sequence (see ccm.server.runtime): stop accepting, then our part (live
        sessions ended, connections closed with 1001), then uvicorn's (in-flight requests, then
        the lifespan's exit, which flushes the writer)."""
        for server in self.servers:
            server.close()
        runtime = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            await runtime.close_connections()
        await super().shutdown(sockets)


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ccm, loaded, with the transport limits installed (pending
    connection caps, request deadline: see ccm/server/limits.py). `overrides` are uvicorn.Config
    arguments (tests pick the loop and HTTP implementation)."""
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "log_config": None,
        "ws_max_size": settings.server.max_frame_bytes,
        "ws_ping_interval": settings.server.ws_ping_interval.total_seconds(),
        "ws_ping_timeout": settings.server.ws_ping_interval.total_seconds(),
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": 10,
        "server_header": False,
        # An idle keep-alive connection holds a descriptor: no longer than a request may take.
        "timeout_keep_alive": min(5, max(1, int(settings.limits.request_timeout.total_seconds()))),
        **overrides,
    }
    config = uvicorn.Config(app, **options)
    install(config, app.state.connections)
    return config


def run_server(app: FastAPI, settings: Settings) -> None:
    raise_open_files_limit()  # before the first socket: thousands of clients need descriptors
    config = uvicorn_config(app, settings)
    # uvicorn restores the SIGTERM handler it found when it stops, then raises the signal again
    # (its documented behaviour, to end as a signalled process would). A stop we completed
    # gracefully ends with status 0 instead: the handler found is this one.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        CcmServer(config, app).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
