"""The `/ws` endpoint: token check, REGISTER, the receive loop, and errors turned into AIP replies
or close codes (1007 bad payload, 1008 policy, 1009 too big).

Frames of one connection are handled one after the other, in order. A connection silent for more
than 1.5x the heartbeat interval is closed with reason `heartbeat_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from ccm.domain import DisconnectReason
from ccm.protocol import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    ClientMessageType,
    FrameError,
    decode_client_message,
    error_frame,
)
from ccm.server import ws_probe
from ccm.server.auth import Via, authenticate
from ccm.server.hub import Hub
from ccm.server.peer import SOCKET_GONE, Peer
from ccm.server.registration import RegistrationRefused

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD_FRAMES = 20
_PROTOCOL_CLOSE_CODES = {1002, 1003, CLOSE_INVALID_PAYLOAD}


class _Closed(Exception):
    """The client went away (close frame or broken socket)."""

    def __init__(self, code: int | None) -> None:
        self.code = code


async def _receive_text(websocket: WebSocket, max_bytes: int) -> str:
    """One text frame, or FrameError for binary/oversized frames."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise _Closed(message.get("code"))
    text: str | None = message.get("text")
    if text is None:
        raise FrameError(
            "binary frames are not supported: send each AIP message as one JSON text frame",
            CLOSE_INVALID_PAYLOAD,
            "binary_frame",
        )
    if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:
        raise FrameError(f"frame larger than {max_bytes} bytes", CLOSE_TOO_BIG, "frame_too_large")
    return text


async def _refuse(websocket: WebSocket, text: str, code: int) -> None:
    """ERROR frame, then close: how every registration failure ends."""
    with contextlib.suppress(*SOCKET_GONE):  # the client did not wait for the answer
        await websocket.send_text(error_frame(text))
        await websocket.close(code=code, reason=_close_reason(text))


def _close_reason(text: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8 (RFC 6455), cut on a character."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def _reason_for_close_code(code: int | None) -> DisconnectReason:
    """What a close the client (or uvicorn on its behalf) sent means for the connection row.
    uvicorn enforces ws_max_size itself and reports its 1009 as a disconnect; it closes invalid
    UTF-8 (1007) and broken framing (1002) itself too."""
    if code in (None, 1000, 1001):
        return DisconnectReason.CLOSED
    if code == CLOSE_TOO_BIG:
        return DisconnectReason.FRAME_TOO_LARGE
    if code in _PROTOCOL_CLOSE_CODES:
        return DisconnectReason.PROTOCOL_ERROR
    return DisconnectReason.CONNECTION_LOST


def _remote(websocket: WebSocket) -> str | None:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else None


WS_PATH = "/ws"


class WebSocketEndpoint:
    """ASGI middleware, the innermost: a WebSocket on `/ws` goes straight to
    `websocket_endpoint`. Starlette's exception middleware, router and route wrappers would add
    nothing for it (the endpoint answers its own errors) but cost a coroutine frame and closures
    each, kept for as long as the connection lives (about 6 KB per idle connection), and a
    wrapper call per frame sent. Every other request goes to the app's routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and _route_path(scope) == WS_PATH:
            await websocket_endpoint(WebSocket(scope, receive, send))
            return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the app's root path, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def websocket_endpoint(websocket: WebSocket) -> None:
    hub: Hub = websocket.app.state.hub
    server = hub.settings.server
    if authenticate(websocket.app, websocket.query_params.get("token"), Via.WEBSOCKET) is None:
        # Closing before accept makes uvicorn answer the upgrade with HTTP 403.
        logger.warning("refused websocket: invalid or missing token remote=%s", _remote(websocket))
        hub.metrics.registrations_refused.labels("bad_token").inc()
        await websocket.close(code=CLOSE_POLICY, reason="Invalid or missing token")
        return
    await websocket.accept()
    ws_probe.forget_handshake(websocket)
    flapping = hub.flapping.check_address(websocket.client.host if websocket.client else None)
    if flapping is not None:
        hub.metrics.registrations_refused.labels("flapping").inc()
        await _refuse(websocket, flapping, CLOSE_POLICY)
        return
    max_bytes = server.max_frame_bytes
    try:
        async with asyncio.timeout(server.register_timeout.total_seconds()):
            text = await _receive_text(websocket, max_bytes)
        msg = decode_client_message(text, max_depth=hub.settings.limits.max_json_depth)
    except TimeoutError:
        hub.metrics.registrations_refused.labels("register_timeout").inc()
        await _refuse(
            websocket,
            f"REGISTER expected within {server.register_timeout.total_seconds():g} s",
            CLOSE_POLICY,
        )
        return
    except FrameError as exc:
        hub.metrics.protocol_errors.labels(exc.kind).inc()
        hub.metrics.registrations_refused.labels(exc.kind).inc()
        await _refuse(websocket, exc.reason, exc.close_code)
        return
    except _Closed:
        return
    if msg.type is not ClientMessageType.REGISTER:
        hub.metrics.protocol_errors.labels("not_register").inc()
        hub.metrics.registrations_refused.labels("not_register").inc()
        await _refuse(websocket, "the first frame must be a REGISTER message", CLOSE_POLICY)
        return
    try:
        peer = await hub.register(websocket, msg, _remote(websocket))
    except RegistrationRefused as exc:
        logger.warning("registration refused client_id=%s: %s", msg.client_id, exc)
        hub.metrics.registrations_refused.labels(exc.kind).inc()
        await _refuse(websocket, str(exc), CLOSE_POLICY)
        return
    websocket.app.state.connections.registered(websocket.scope)  # no longer pending
    # An idle connection waits here for hours: do not keep its REGISTER frame (text and parsed
    # message, a few KB with system info) alive in this frame until the next message arrives.
    del text, msg

    peer.handler = asyncio.current_task()
    peer.watch_silence(1.5 * server.heartbeat_interval.total_seconds())
    reason = DisconnectReason.CLOSED
    try:
        reason = await _receive_loop(websocket, hub, peer, max_bytes)
    except asyncio.CancelledError:
        # Peer.interrupt: silence past the limit, or a client that cannot even be sent a close
        # frame. Any other cancel (the server stopping) goes on up.
        task = asyncio.current_task()
        if peer.interrupted is None or task is None or task.cancelling() != 1:
            raise
        task.uncancel()
        reason = peer.interrupted
    except _Closed as closed:
        reason = _reason_for_close_code(closed.code)
    except SOCKET_GONE:
        # Receiving after the server closed the socket (kick) or a broken transport.
        reason = DisconnectReason.CONNECTION_LOST
    finally:
        if peer.interrupted is DisconnectReason.HEARTBEAT_TIMEOUT:
            reason = peer.interrupted
            peer.kick(reason)
        await hub.disconnect(peer, peer.close_reason or reason)
        await peer.wait_closed()  # a kick's close carries its code (1007, 1008, 1009): not 1000
        if websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(*SOCKET_GONE):
                await websocket.close()


async def _receive_loop(
    websocket: WebSocket, hub: Hub, peer: Peer, max_bytes: int
) -> DisconnectReason:
    """Frames of a registered connection, handled one after the other until the loop must end;
    returns why, unless the client closes (_Closed) or the socket breaks."""
    bad_frames = 0
    clock = asyncio.get_running_loop().time
    max_depth = hub.settings.limits.max_json_depth
    while peer.interrupted is None:
        try:
            peer.receiving = True
            try:
                text = await _receive_text(websocket, max_bytes)
            finally:
                peer.receiving = False
            peer.last_frame_at = clock()
            msg = decode_client_message(text, max_depth=max_depth)
        except FrameError as exc:
            hub.metrics.protocol_errors.labels(exc.kind).inc()
            if exc.close_code == CLOSE_TOO_BIG:
                peer.kick(DisconnectReason.FRAME_TOO_LARGE, CLOSE_TOO_BIG)
                return DisconnectReason.FRAME_TOO_LARGE
            bad_frames += 1
            peer.send(error_frame(exc.reason))
            if bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES:
                # The client is reading: let it have the last ERROR before the close.
                await peer.flush_and_close(exc.close_code, DisconnectReason.PROTOCOL_ERROR)
                return DisconnectReason.PROTOCOL_ERROR
            continue
        bad_frames = 0
        try:
            await hub.handle(peer, msg)
        except Exception:
            # One bad frame never ends the connection or touches anyone else; the traceback is
            # logged, and the client told which frame failed.
            logger.exception("error handling %s client_id=%s", msg.type.value, peer.client_id)
            hub.metrics.protocol_errors.labels("internal_error").inc()
            peer.send(error_frame(f"internal error while handling {msg.type.value}"))
    return peer.interrupted
