"""Transport limits against a real uvicorn: requests and upgrades that never complete are closed
with 408 after `limits.request_timeout`, connections that have not registered yet are capped in
total and per remote address with a 503 that says which limit, registered clients and finished
requests do not count, and `/api/health` reports file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from ccm.config import LimitsSettings
from ccm.server.limits import ConnectionGate
from tests.server.support import API_KEY, AipClient, ServerThread, run, track

TIMEOUT = 1.0  # limits.request_timeout in these tests
BOUND = 15.0  # generous: a socket the server never closes would hang much longer


@pytest.fixture
def sockets() -> Iterator[Callable[[ServerThread], socket.socket]]:
    """Raw TCP connections to a server, all closed at the end."""
    opened: list[socket.socket] = []

    def connect(server: ServerThread) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
        opened.append(sock)
        return sock

    yield connect
    for sock in opened:
        with contextlib.suppress(OSError):
            sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails after BOUND s)."""
    sock.settimeout(BOUND)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def quick(server_factory: Callable[..., ServerThread]) -> ServerThread:
    return server_factory(**{"limits.request_timeout": TIMEOUT})


class TestIncompleteRequests:
    def test_a_silent_connection_is_closed_with_408(
        self, quick: ServerThread, sockets: Callable[[ServerThread], socket.socket]
    ) -> None:
        """A socket that sends nothing is answered 408 and closed."""
        reply = read_until_closed(sockets(quick))
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"limits.request_timeout" in reply

    @pytest.mark.parametrize(
        "start",
        [
            b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Dribble: ",
            b"GET /ws?token=" + API_KEY.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
            b"POST /api/dispatch HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 1000\r\n"
            b"x-api-key: " + API_KEY.encode() + b"\r\ncontent-type: application/json\r\n\r\n{",
        ],
        ids=["headers", "websocket-upgrade", "body"],
    )
    def test_a_dribbling_request_is_closed(
        self, quick: ServerThread, sockets: Callable[[ServerThread], socket.socket], start: bytes
    ) -> None:
        """Headers, an upgrade or a body that trickle in a byte at a time never complete: the
        connection is closed although bytes keep arriving."""
        sock = sockets(quick)
        sock.sendall(start)
        closed = False
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
            except OSError:
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "the server kept a request open that never completed"

    def test_the_second_request_on_a_connection_has_its_own_deadline(
        self, quick: ServerThread, sockets: Callable[[ServerThread], socket.socket]
    ) -> None:
        """After a complete request and its answer, a second request that never completes is
        closed too (keep-alive is no way around the deadline)."""
        sock = sockets(quick)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(BOUND)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")

    def test_complete_requests_and_registered_clients_outlive_the_deadline(
        self, quick: ServerThread
    ) -> None:
        """A registered WebSocket idle for several deadlines is still served, and an HTTP
        client's requests keep working on one connection."""

        async def scenario() -> tuple[dict[str, Any], int]:
            device = track(await AipClient.connect(quick.ws_url))
            await device.register_device("idle-dev")
            await asyncio.sleep(3 * TIMEOUT)
            await device.send(type="heartbeat", client_id="idle-dev")
            beat = await device.recv()
            async with httpx.AsyncClient(
                base_url=quick.http_url, headers={"X-API-Key": API_KEY}, timeout=BOUND
            ) as http:
                await http.get("/api/health")
                await asyncio.sleep(0.5 * TIMEOUT)
                status = (await http.get("/api/health")).status_code
            return beat, status

        beat, status = run(scenario())
        assert (beat["type"], beat["status"]) == ("heartbeat", "ok")
        assert status == 200

    def test_an_event_stream_is_not_cut_by_the_deadline(self, quick: ServerThread) -> None:
        """`/api/events` (a complete request whose answer goes on) keeps streaming past the
        request deadline."""

        async def scenario() -> int:
            events = 0
            async with (
                httpx.AsyncClient(
                    base_url=quick.http_url, headers={"X-API-Key": API_KEY}, timeout=BOUND
                ) as http,
                http.stream("GET", "/api/events") as stream,
            ):
                started = asyncio.get_running_loop().time()
                async for line in stream.aiter_lines():
                    if line.startswith("event: snapshot"):
                        events += 1
                    if asyncio.get_running_loop().time() - started > 3 * TIMEOUT:
                        break
            return events

        async def with_changes() -> int:
            reader = asyncio.create_task(scenario())
            for n in range(6):  # registrations change the snapshot, so new events follow
                await asyncio.sleep(0.6 * TIMEOUT)
                client = track(await AipClient.connect(quick.ws_url))
                await client.register_device(f"stream-dev-{n}")
            return await reader

        assert run(with_changes()) >= 2


class TestPendingCaps:
    def test_connections_over_the_per_address_cap_get_503_naming_it(
        self,
        server_factory: Callable[..., ServerThread],
        sockets: Callable[[ServerThread], socket.socket],
    ) -> None:
        """With 3 silent connections pending from 127.0.0.1 and a cap of 3, the next one is
        answered 503 with the limit's name; a WebSocket client sees the same refusal."""
        server = server_factory(**{"limits.max_pending_per_address": 3})
        silent = [sockets(server) for _ in range(3)]
        wait_until(lambda: server.app.state.connections.pending_count() == 3, "3 pending")
        extra = sockets(server)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert b"limits.max_pending_per_address" in reply

        async def refused_websocket() -> InvalidStatus:
            with pytest.raises(InvalidStatus) as caught:
                await websockets.connect(server.ws_url)
            return caught.value

        assert run(refused_websocket()).response.status_code == 503
        for sock in silent:
            sock.close()
        wait_until(lambda: server.app.state.connections.pending_count() == 0, "none pending")

        async def registers() -> dict[str, Any]:
            client = track(await AipClient.connect(server.ws_url))
            return await client.register_device("after-the-flood")

        assert run(registers())["status"] == "ok"

    def test_the_total_cap_holds_too(
        self,
        server_factory: Callable[..., ServerThread],
        sockets: Callable[[ServerThread], socket.socket],
    ) -> None:
        """`limits.max_pending_connections` bounds pending connections from all addresses."""
        server = server_factory(**{"limits.max_pending_connections": 2})
        held = [sockets(server) for _ in range(2)]
        wait_until(lambda: server.app.state.connections.pending_count() == 2, "2 pending")
        extra = sockets(server)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503 ")
        assert b"limits.max_pending_connections" in reply
        assert len(held) == 2

    def test_registered_clients_and_answered_requests_leave_the_count(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """With a cap of 2, ten devices register one after another and stay connected, and
        HTTP requests on kept-alive connections go on: neither counts as pending."""
        server = server_factory(**{"limits.max_pending_per_address": 2})

        async def scenario() -> tuple[list[str], list[int], int, int]:
            replies = []
            for n in range(10):
                client = track(await AipClient.connect(server.ws_url))
                replies.append((await client.register_device(f"capped-{n}"))["status"])
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=BOUND
            ) as http:
                statuses = [(await http.get("/api/devices")).status_code for _ in range(5)]
            pending = server.app.state.connections.pending_count()
            return replies, statuses, pending, len(server.registry.list_clients())

        replies, statuses, pending, online = run(scenario())
        assert replies == ["ok"] * 10
        assert statuses == [200] * 5
        assert (pending, online) == (0, 10)

    def test_a_connection_refused_before_register_leaves_the_count(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """WebSockets that close or are refused before REGISTER do not stay counted."""
        server = server_factory(**{"limits.max_pending_per_address": 2})

        async def scenario() -> str:
            for _ in range(5):
                client = await AipClient.connect(server.ws_url)
                await client.close()
            for _ in range(5):
                client = await AipClient.connect(server.ws_url)
                await client.send(type="heartbeat", client_id="not-registered")
                with contextlib.suppress(Exception):
                    await client.recv()
                await client.close()
            await asyncio.sleep(0.2)
            client = track(await AipClient.connect(server.ws_url))
            return str((await client.register_device("still-admitted"))["status"])

        assert run(scenario()) == "ok"
        wait_until(lambda: server.app.state.connections.pending_count() == 0, "none pending")


class TestFileDescriptors:
    def test_health_reports_descriptors(self, server: ServerThread) -> None:
        """`/api/health` shows open descriptors against the limit."""
        with server.http() as http:
            fds = http.get("/api/health").json()["file_descriptors"]
        assert fds["limit"] > 0
        assert fds["open"] is None or 0 < fds["open"] < fds["limit"]
        assert fds["short"] is False

    def test_running_short_is_logged_and_degrades_health(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """At 90% of the limit the gate logs a WARNING and reports short; below 80% it logs
        that it recovered."""
        count = {"open": 950}
        gate = ConnectionGate(
            LimitsSettings(), fd_limit=lambda: 1000, count_fds=lambda: count["open"]
        )
        with caplog.at_level(logging.INFO, logger="ccm.server.limits"):
            assert gate.file_descriptors().short
            count["open"] = 850  # between the marks: still short (no flapping)
            assert gate.file_descriptors().short
            count["open"] = 700
            assert not gate.file_descriptors().short
        messages = [r.getMessage() for r in caplog.records]
        assert any("file descriptors running short: 950 open, limit 1000" in m for m in messages)
        assert any("back to normal" in m for m in messages)
        assert [r.levelno for r in caplog.records if "running short" in r.getMessage()] == [
            logging.WARNING
        ]

    def test_the_pending_cap_is_at_most_half_the_fd_limit(self) -> None:
        """A configured cap above half the open-files limit is lowered to that half."""
        gate = ConnectionGate(LimitsSettings(max_pending_connections=5000), fd_limit=lambda: 1024)
        assert gate.max_pending == 512
