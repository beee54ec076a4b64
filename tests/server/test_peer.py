"""Peer's send path without a server: written at once when the transport takes the frame, queued
behind a send that waits, and closed as a slow consumer when that wait passes the timeout; and
its silence timer. Timeouts are driven by an event loop whose clock only the test moves, so no
test depends on how fast the machine is."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ccm.domain import ClientType
from ccm.server.peer import Peer


class _Socket:
    """Stands in for a WebSocket: sends complete at once unless `paused`, like an ASGI send
    whose transport stopped taking data."""

    application_state = None

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.paused: asyncio.Future[None] | None = None
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        if self.paused is not None:
            await self.paused
        self.sent.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class _ManualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose `time()` stands still until `advance` moves it. Timers (`call_at`,
    `asyncio.timeout`) fire when the test says, in the order of their deadlines."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        """Let what can run now run, move the clock forward, then return once every callback
        due by the new time has run."""
        await self._settle()
        self.now += seconds
        await self._settle()

    async def _settle(self) -> None:
        # A timer due now is run in the next loop iteration, after the callbacks already
        # ready and together with every other due timer; the future's callback, and so our
        # return, comes one iteration after that.
        settled = self.create_future()
        self.call_at(self.now, settled.set_result, None)
        await settled


def _run_on_manual_clock(scenario: Callable[[_ManualClockLoop], Coroutine[Any, Any, None]]) -> None:
    loop = _ManualClockLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


def _peer(socket: _Socket, send_timeout: float = 5.0) -> Peer:
    return Peer(
        websocket=socket,  # type: ignore[arg-type]
        client_id="dev",
        client_type=ClientType.DEVICE,
        remote_address=None,
        send_timeout=send_timeout,
    )


def test_a_frame_the_transport_takes_is_written_without_a_task() -> None:
    """With nothing queued and a transport that takes the frame, `send` writes it at once."""

    async def scenario() -> None:
        socket = _Socket()
        peer = _peer(socket)
        assert peer.send("a")
        assert peer.send("b")
        assert socket.sent == ["a", "b"]  # written before any await: no task was needed
        assert peer._sender is None
        assert peer._outbox is None

    asyncio.run(scenario())


def test_frames_behind_a_waiting_send_go_out_in_order_once_it_completes() -> None:
    """Frames sent while one waits are queued and written in order once it completes."""

    async def scenario() -> None:
        socket = _Socket()
        socket.paused = asyncio.get_running_loop().create_future()
        peer = _peer(socket)
        assert peer.send("1")
        assert peer.send("2")
        assert peer.send("3")
        assert socket.sent == []
        assert peer._sender is not None
        socket.paused.set_result(None)
        socket.paused = None
        for _ in range(100):
            if peer._sender is None:
                break
            await asyncio.sleep(0)
        assert socket.sent == ["1", "2", "3"]
        assert peer._outbox is None  # idle again: no queue kept
        assert peer.send("4")
        assert socket.sent[-1] == "4"
        assert peer.close_reason is None

    asyncio.run(scenario())


def test_a_send_that_waits_past_the_timeout_closes_a_slow_consumer() -> None:
    """A send still waiting when the send timeout passes closes the peer as `slow_consumer`."""

    async def scenario(loop: _ManualClockLoop) -> None:
        socket = _Socket()
        socket.paused = loop.create_future()  # never completes
        peer = _peer(socket, send_timeout=5.0)
        assert peer.send("stuck")
        await loop.advance(4.0)
        assert peer.close_reason is None  # still inside the timeout
        await loop.advance(1.0)
        assert peer.close_reason == "slow_consumer"
        assert not peer.send("more")  # refused once closing
        await peer.wait_closed()
        await peer.stop_sender()
        assert socket.sent == []

    _run_on_manual_clock(scenario)


def test_a_full_outbox_closes_a_slow_consumer() -> None:
    """Once the outbox behind a waiting send is full, `send` refuses and the peer is closed."""

    async def scenario() -> None:
        socket = _Socket()
        socket.paused = asyncio.get_running_loop().create_future()
        peer = _peer(socket)
        results = [peer.send(str(i)) for i in range(2000)]
        assert results[0]
        assert not all(results)
        assert peer.close_reason == "slow_consumer"
        await peer.stop_sender()
        await peer.wait_closed()

    asyncio.run(scenario())


def test_silence_past_the_limit_interrupts_and_a_frame_moves_the_deadline() -> None:
    """The receive loop is interrupted `limit` seconds after the last frame, not after the
    watch began: a frame moves the deadline, and silence past the moved one interrupts."""

    async def scenario(loop: _ManualClockLoop) -> None:
        peer = _peer(_Socket())
        peer.watch_silence(10.0)
        await loop.advance(6.0)
        peer.last_frame_at = loop.time()  # a frame arrived at 6 s: the deadline moves to 16 s
        await loop.advance(6.0)  # 12 s: past the first deadline, before the moved one
        assert peer.interrupted is None
        await loop.advance(3.0)  # 15 s
        assert peer.interrupted is None
        await loop.advance(1.0)  # 16 s: the moved deadline
        assert peer.interrupted == "heartbeat_timeout"
        await peer.stop_sender()

    _run_on_manual_clock(scenario)
