"""Peer: one registered WebSocket connection, with its bound identity and a bounded outbox.

Sends never block the caller. A frame is written at once when nothing is queued before it and the
transport takes it (the usual case: the ASGI send only waits when the client stops reading);
otherwise it goes to the peer's outbox, which a sender task writes with a timeout. A peer that
does not read (its outbox fills, or one send takes longer than the timeout) is closed with reason
`slow_consumer`, so it cannot stall the handler of anyone else.

Idle connections are most of a fleet: one holds no task and no queue, only a timer that checks
its silence (moved when it fires, not on every frame).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ccm.domain import ClientType, DisconnectReason
from ccm.metrics import Metrics
from ccm.protocol import CLOSE_POLICY
from ccm.server import eager_send, ws_probe

logger = logging.getLogger(__name__)

OUTBOX_SIZE = 1024

SOCKET_GONE = (WebSocketDisconnect, RuntimeError, OSError)
"""What a send or close on a WebSocket that is already closed raises: starlette's
WebSocketDisconnect (it wraps the transport's OSError) and RuntimeError (a send after the close),
uvicorn's ClientDisconnected (an OSError). The receive loop notices the close and cleans up."""


@dataclass(eq=False, slots=True)
class Peer:
    """A connection after REGISTER: identity and role are fixed here and never read from frames."""

    websocket: WebSocket
    client_id: str
    client_type: ClientType
    remote_address: str | None
    send_timeout: float
    target_id: str | None = None
    epoch: int = 0
    close_reason: DisconnectReason | None = None
    metrics: Metrics | None = None
    _outbox: collections.deque[str] | None = None
    """Frames waiting behind one the transport did not take at once; None when nothing waits."""
    _sender: asyncio.Task[None] | None = None
    """The task writing the outbox; it ends when the outbox is empty."""
    _send_failed: bool = False
    _sender_stopped: bool = False
    _closing: bool = False
    _closer: asyncio.Task[None] | None = None
    handler: asyncio.Task[None] | None = None
    """The connection's receive loop (ws.py), ended by `interrupt`."""
    receiving: bool = False
    """True while the receive loop waits for the next frame (a safe point to cancel it)."""
    interrupted: DisconnectReason | None = None
    """Why the receive loop must end (`heartbeat_timeout`, `connection_lost`), once it must."""
    last_frame_at: float = 0.0
    """Event-loop time of the last frame received; the receive loop stamps it."""
    _silence_limit: float = 0.0
    _silence_timer: asyncio.TimerHandle | None = None

    @property
    def is_device(self) -> bool:
        return self.client_type is ClientType.DEVICE

    @property
    def is_constellation(self) -> bool:
        return self.client_type is ClientType.CONSTELLATION

    # -- sending ---------------------------------------------------------------------------------

    def send(self, frame: str) -> bool:
        """Write or queue a frame. False if the peer is closing or too slow (it is then being
        closed)."""
        if self._closing or self._sender_stopped or self._send_failed:
            return False
        if self._sender is None:
            # Nothing queued before it: write it now, with no task and no timer.
            try:
                waiting = eager_send.start(self.websocket.send_text(frame))
            except SOCKET_GONE:
                self._send_failed = True
                return False
            if waiting is not None:
                # The transport is paused (the client reads slower than we write): finish this
                # frame, and any queued after it, in the background under the send timeout.
                self._outbox = collections.deque()
                self._sender = asyncio.get_running_loop().create_task(self._send_queued(waiting))
        else:
            outbox = self._outbox
            assert outbox is not None
            if len(outbox) >= OUTBOX_SIZE:
                self.kick(DisconnectReason.SLOW_CONSUMER)
                return False
            outbox.append(frame)
        if self.metrics is not None:
            # Frames start with {"type":"<type>", (protocol.server_frame); no JSON parse needed.
            self.metrics.frame_out(frame[9 : frame.find('"', 9)])
        return True

    async def _send_queued(self, first: eager_send.Suspended) -> None:
        outbox = self._outbox
        try:
            async with asyncio.timeout(self.send_timeout):
                await first.finish()
            while outbox and not self._sender_stopped:
                frame = outbox.popleft()
                async with asyncio.timeout(self.send_timeout):
                    await self.websocket.send_text(frame)
        except TimeoutError:
            self._send_failed = True
            self.kick(DisconnectReason.SLOW_CONSUMER)
        except SOCKET_GONE:
            self._send_failed = True
        finally:
            self._sender = None
            self._outbox = None

    async def stop_sender(self) -> None:
        """Stop writing and watching (the connection is being removed); drop what is queued."""
        self._sender_stopped = True
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        sender = self._sender
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender  # it ends on socket errors itself; anything else is a bug: raised
        self._outbox = None

    # -- closing ---------------------------------------------------------------------------------

    def kick(self, reason: DisconnectReason, code: int = CLOSE_POLICY) -> None:
        """Close this connection from the server side, recording `reason`."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        logger.warning("closing connection client_id=%s reason=%s", self.client_id, reason)
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def flush_and_close(self, code: int, reason: DisconnectReason) -> None:
        """Deliver what is queued (bounded by the send timeout), then close."""
        if self._closing:
            return
        self.close_reason = reason
        self._closing = True  # nothing more is queued; what is queued still goes out
        sender = self._sender
        if sender is not None:
            with contextlib.suppress(TimeoutError):  # a slow reader: close what it has
                await asyncio.wait_for(asyncio.shield(sender), self.send_timeout)
        await self._close(code, reason)

    async def _close(self, code: int, reason: DisconnectReason) -> None:
        sender = self._sender
        if sender is not None and sender is not asyncio.current_task():
            sender.cancel()
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                await asyncio.wait_for(
                    self.websocket.close(code=code, reason=reason.value), self.send_timeout
                )
            except TimeoutError:
                # Not even the close frame could be written: the client does not read, so it
                # will never answer it either. Waiting for its close (or for the heartbeat
                # timeout) would keep it registered for minutes.
                self.interrupt(DisconnectReason.CONNECTION_LOST)
            except SOCKET_GONE:  # already gone: the receive loop sees the disconnect
                pass

    async def wait_closed(self) -> None:
        """Wait for the close a kick started (bounded by the send timeout inside it)."""
        if self._closer is not None:
            await self._closer  # _close handles a gone socket and a timeout itself

    # -- the receive loop ------------------------------------------------------------------------

    def interrupt(self, reason: DisconnectReason) -> None:
        """End the receive loop: at once if it is waiting for a frame, else after this frame."""
        if self.interrupted is not None:
            return
        self.interrupted = reason
        handler = self.handler
        if handler is not None and self.receiving and not handler.done():
            handler.cancel()  # ws.py turns this cancel into a normal end with `interrupted`

    def watch_silence(self, limit: float) -> None:
        """Interrupt the receive loop with `heartbeat_timeout` after `limit` seconds without a
        frame. The receive loop only stamps `last_frame_at`; the one timer of the connection is
        moved when it fires, so a frame costs no timer of its own."""
        loop = asyncio.get_running_loop()
        self._silence_limit = limit
        self.last_frame_at = loop.time()
        self._silence_timer = loop.call_at(self.last_frame_at + limit, self._check_silence, loop)

    def _check_silence(self, loop: asyncio.AbstractEventLoop) -> None:
        due = self.last_frame_at + self._silence_limit
        if loop.time() >= due:
            # A pong counts as liveness: a stock UFO device heartbeats every 120 s, and with a
            # shorter server.heartbeat_interval it would be closed while it answers pings.
            answered = ws_probe.ping_answered_at(self.websocket)
            if answered is not None and answered > self.last_frame_at:
                self.last_frame_at = answered
                due = answered + self._silence_limit
        if loop.time() < due:
            self._silence_timer = loop.call_at(due, self._check_silence, loop)
            return
        self._silence_timer = None
        self.interrupt(DisconnectReason.HEARTBEAT_TIMEOUT)
