"""Peer's send path without a server: written at once when the transport takes the frame, queued
behind a send that waits, and closed as a slow consumer when that wait passes the timeout."""

from __future__ import annotations

import asyncio

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


def _peer(socket: _Socket, send_timeout: float = 5.0) -> Peer:
    return Peer(
        websocket=socket,  # type: ignore[arg-type]
        client_id="dev",
        client_type=ClientType.DEVICE,
        remote_address=None,
        send_timeout=send_timeout,
    )


def test_a_frame_the_transport_takes_is_written_without_a_task() -> None:
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
    async def scenario() -> None:
        socket = _Socket()
        socket.paused = asyncio.get_running_loop().create_future()  # never completes
        peer = _peer(socket, send_timeout=0.05)
        assert peer.send("stuck")
        await asyncio.sleep(0.3)
        assert peer.close_reason == "slow_consumer"
        assert not peer.send("more")  # refused once closing
        await peer.wait_closed()
        await peer.stop_sender()
        assert socket.sent == []

    asyncio.run(scenario())


def test_a_full_outbox_closes_a_slow_consumer() -> None:
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
    async def scenario() -> None:
        peer = _peer(_Socket())
        loop = asyncio.get_running_loop()
        peer.watch_silence(0.2)
        await asyncio.sleep(0.12)
        peer.last_frame_at = loop.time()  # a frame arrived: the deadline moves
        await asyncio.sleep(0.12)
        assert peer.interrupted is None
        await asyncio.sleep(0.2)
        assert peer.interrupted == "heartbeat_timeout"
        await peer.stop_sender()

    asyncio.run(scenario())
