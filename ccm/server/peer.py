"""Peer: one registered WebSocket connection, with its bound identity and a bounded outbox.

Sends never block the caller: frames go to the peer's outbox and a sender task writes them with a
timeout. A peer that does not read (its outbox fills, or one send takes longer than the timeout)
is closed with reason `slow_consumer`, so it cannot stall the handler of anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketState

from ccm.protocol import CLOSE_POLICY
from ccm.metrics import Metrics
from ccm.registry import ClientType

logger = logging.getLogger(__name__)

OUTBOX_SIZE = 1024


@dataclass(eq=False)
class Peer:
    """A connection after REGISTER: identity and role are fixed here and never read from frames."""

    websocket: WebSocket
    client_id: str
    client_type: ClientType
    remote_address: str | None
    send_timeout: float
    target_id: str | None = None
    epoch: int = 0
    close_reason: str | None = None
    metrics: Metrics | None = None
    _outbox: asyncio.Queue[str | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=OUTBOX_SIZE)
    )
    _sender: asyncio.Task[None] | None = None
    _sender_stopped: bool = False
    _closing: bool = False
    _closer: asyncio.Task[None] | None = None
    handler: asyncio.Task[None] | None = None
    """The connection's receive loop (ws.py), ended by `_abandon` when a close cannot be sent."""
    receiving: bool = False
    """True while the receive loop waits for the next frame (a safe point to cancel it)."""
    abandoned: bool = False

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name=f"ccm-send-{self.client_id}")

    @property
    def is_device(self) -> bool:
        return self.client_type is ClientType.DEVICE

    @property
    def is_constellation(self) -> bool:
        return self.client_type is ClientType.CONSTELLATION

    def send(self, frame: str) -> bool:
        """Queue a frame. False if the peer is closing or too slow (it is then being closed)."""
        if self._closing:
            return False
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.kick("slow_consumer")
            return False
        if self.metrics is not None:
            # Frames start with {"type":"<type>", (protocol.server_frame); no JSON parse needed.
            self.metrics.count(self.metrics.frames_out, frame[9 : frame.find('"', 9)])
        return True

    def kick(self, reason: str, code: int = CLOSE_POLICY) -> None:
        """Close this connection from the server side, recording `reason`."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason
        logger.warning("closing connection client_id=%s reason=%s", self.client_id, reason)
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def flush_and_close(self, code: int, reason: str) -> None:
        """Deliver what is queued (bounded by the send timeout), then close."""
        if self._closing:
            return
        self.close_reason = reason
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(None)
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._sender), self.send_timeout)
        self._closing = True
        await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        if self._sender is not None and self._sender is not asyncio.current_task():
            self._sender.cancel()
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                await asyncio.wait_for(
                    self.websocket.close(code=code, reason=reason[:120]), self.send_timeout
                )
            except TimeoutError:
                # Not even the close frame could be written: the client does not read, so it
                # will never answer it either. Waiting for its close (or for the heartbeat
                # timeout) would keep it registered for minutes.
                self._abandon()
            except Exception:  # already gone: the receive loop sees the disconnect
                pass

    async def wait_closed(self) -> None:
        """Wait for the close a kick started (bounded by the send timeout inside it)."""
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await self._closer

    def _abandon(self) -> None:
        """End the receive loop of a connection whose client cannot be reached any more."""
        self.abandoned = True
        handler = self.handler
        if handler is not None and self.receiving and not handler.done():
            handler.cancel()  # ws.py turns this cancel into a normal end with close_reason

    async def stop_sender(self) -> None:
        # The flag, not only the cancel: on Python 3.11 a cancel that lands while a send
        # completes is swallowed by wait_for, and the loop would wait on the outbox forever
        # (and this await with it, so the disconnect would never finish).
        self._sender_stopped = True
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender

    async def _send_loop(self) -> None:
        while not self._sender_stopped:
            frame = await self._outbox.get()
            if frame is None:
                return
            try:
                await asyncio.wait_for(self.websocket.send_text(frame), self.send_timeout)
            except TimeoutError:
                self.kick("slow_consumer")
                return
            except Exception:  # the socket is gone; the receive loop notices and cleans up
                return
