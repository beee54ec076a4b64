"""Probe a WebSocket with a ping: does the client at the other end still answer?

ASGI has no ping message, so this reaches into the uvicorn protocol object that serves the
connection (the `send` callable uvicorn hands the app is its bound `asgi_send`; KeepTransport,
the app's outermost middleware, keeps it in the scope before Starlette wraps it) and uses its
own keepalive ping: the
sans-I/O implementation's `send_keepalive_ping` / `pending_ping_payload` (cleared when the
matching pong arrives), or the legacy websockets implementation's public `ping()`. Both are
uvicorn internals, kept in this module alone; tests/server/test_client_edges.py fails
loudly if uvicorn changes them. With another implementation the probe answers None (unknown),
and callers treat the connection as alive.

`forget_handshake` is the other use of the same object: uvicorn keeps the handshake's parsed
request and response for as long as the connection lives, though it reads neither after the
accept.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

POLL_SECONDS = 0.02
STALE_SECONDS = 2.0
"""How long a connection whose id a newcomer claims has to answer a ping."""


SCOPE_KEY = "ccm.asgi_send"


class KeepTransport:
    """ASGI middleware: keep the server's own `send` of each WebSocket in its scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[SCOPE_KEY] = send
        await self.app(scope, receive, send)


def _protocol(websocket: WebSocket) -> Any:
    scope = getattr(websocket, "scope", None)
    send = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
    return getattr(send, "__self__", None)


async def probe(websocket: WebSocket, within: float) -> bool | None:
    """True if a pong comes back within `within` seconds, False if not (or the transport is gone),
    None if this server's WebSocket implementation cannot be probed."""
    protocol = _protocol(websocket)
    if protocol is None:
        return None
    transport = getattr(protocol, "transport", None)
    if transport is not None and transport.is_closing():
        return False
    if hasattr(protocol, "send_keepalive_ping") and hasattr(protocol, "pending_ping_payload"):
        return await _probe_sansio(protocol, within)
    ping = getattr(protocol, "ping", None)
    if callable(ping):
        try:
            waiter = await ping()
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - any failure to ping a socket means it is not answering
            return False
        return True
    return None


async def _probe_sansio(protocol: Any, within: float) -> bool:
    if protocol.pending_ping_payload is None:
        # Replace the scheduled keepalive ping by one now: its pong schedules the next one, so
        # the keepalive chain stays single.
        timer = getattr(protocol, "ping_timer", None)
        if timer is not None:
            timer.cancel()
            protocol.ping_timer = None
        with contextlib.suppress(Exception):
            protocol.send_keepalive_ping()
        if protocol.pending_ping_payload is None:
            return not protocol.transport.is_closing()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while protocol.pending_ping_payload is not None:
        if protocol.transport.is_closing():
            return False
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


def forget_handshake(websocket: WebSocket) -> None:
    """Drop the handshake's request and response from the sans-I/O protocol once the accept
    is sent: their parsed headers are about 3.5 KB per idle connection. A no-op with any other
    implementation, or before the accept went out."""
    protocol = _protocol(websocket)
    if protocol is None or not hasattr(protocol, "send_keepalive_ping"):
        return
    if getattr(protocol, "handshake_complete", False):
        for name in ("request", "response"):
            if getattr(protocol, name, None) is not None:
                setattr(protocol, name, None)


def ping_answered_at(websocket: WebSocket) -> float | None:
    """Event-loop time of the last keepalive ping the client answered (sent then, its pong
    came), or None if unknown or the ping in flight is unanswered."""
    protocol = _protocol(websocket)
    if protocol is None or getattr(protocol, "pending_ping_payload", True) is not None:
        return None
    sent = getattr(protocol, "ping_sent_at", None)
    return float(sent) if isinstance(sent, int | float) and sent > 0 else None
