"""Run the app under uvicorn with our logging, frame limit, and a graceful WebSocket shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from ccm.config import Settings
from ccm.errors import CcmError

logger = logging.getLogger(__name__)


class CcmServer(uvicorn.Server):
    """uvicorn.Server that closes our WebSockets with 1001 (recorded as `server_shutdown`)
    before uvicorn's own shutdown would close them with its generic code."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal after its graceful shutdown, so SIGTERM would end
        # the process as killed by the signal (status -15); a stop we completed exits with 0.
        if sig == signal.SIGTERM:
            captured = getattr(self, "_captured_signals", None)  # private in uvicorn >= 0.29
            if isinstance(captured, list) and sig in captured:
                captured.remove(sig)

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
        for server in self.servers:
            server.close()
        dashboard = getattr(self._app.state, "dashboard", None)
        if dashboard is not None:
            dashboard.close()  # end event streams: uvicorn's drain would wait for open browsers
        hub = getattr(self._app.state, "hub", None)
        if hub is not None:
            try:
                await hub.shutdown()
            except Exception:
                logger.exception("error while closing client connections")
        await super().shutdown(sockets)


def run_server(app: FastAPI, settings: Settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        ws_max_size=settings.server.max_frame_bytes,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    CcmServer(config, app).run()
