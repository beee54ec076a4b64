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
from ccm.server.auth import RedactTokens

logger = logging.getLogger(__name__)


class HandledClientErrors(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 text frame as an ERROR with a traceback, although it
    handles it (close 1007). Bad input we handled is a WARNING without a traceback here, so an
    ERROR in the log always means something the server could not handle."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid UTF-8 sequence"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "invalid UTF-8 in a text frame; connection closed with 1007",
                (),
            )
            record.exc_info = record.exc_text = None
        return True


class ConnectionChatter(logging.Filter):
    """Drops uvicorn's three INFO lines per WebSocket (`[accepted]`, `connection open`,
    `connection closed`): ccm logs `client registered` (with the remote address) and `client
    removed` (with the reason) for each connection, and at thousands of connections a minute
    the duplicates cost a tenth of the server's time (the connect/register/close profile in
    tests/benchmarks). They are kept when the log level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        msg = record.msg
        return not (
            msg == "connection open"
            or msg == "connection closed"
            or (isinstance(msg, str) and msg.endswith('" [accepted]'))
        )


class CcmServer(uvicorn.Server):
    """uvicorn.Server that closes our WebSockets with 1001 (recorded as `server_shutdown`)
    before uvicorn's own shutdown would close them with its generic code."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        # uvicorn logs each WebSocket path with its query string, `?token=<key>` included. A
        # filter on the loggers themselves redacts the record before any handler sees it (a
        # handler filter, as in configure_logging, protects only that handler).
        for name in ("uvicorn.error", "uvicorn.access"):
            log = logging.getLogger(name)
            if not any(isinstance(f, RedactTokens) for f in log.filters):
                log.addFilter(RedactTokens())
        error_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, HandledClientErrors) for f in error_log.filters):
            error_log.addFilter(HandledClientErrors())
        chatter = [f for f in error_log.filters if isinstance(f, ConnectionChatter)]
        if error_log.getEffectiveLevel() > logging.DEBUG and not chatter:
            error_log.filters.insert(0, ConnectionChatter())  # before the redaction's regex
        elif error_log.getEffectiveLevel() <= logging.DEBUG:
            for f in chatter:
                error_log.removeFilter(f)

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
