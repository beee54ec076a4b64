"""Fast regression tests for the bugs the fault suite found, one class per bug. The scenario
tests (real processes, real load) found them; these pin each fix in seconds."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from ccm.domain import ClientType
from ccm.errors import StoreUnavailable
from ccm.logs import HandledClientErrors, TextFormatter
from ccm.protocol import CLOSE_INVALID_PAYLOAD, FrameError, decode_client_message
from ccm.server.peer import Peer
from ccm.store.engine import make_engine
from ccm.store.models import connections
from ccm.store.writer import StoreWriter
from ccm.store.writes import Write
from tests.reliability.support import OP_TEXT, Closed, RawWs
from tests.server.support import API_KEY, ServerThread, make_settings

HEARTBEAT = '{"type":"heartbeat","status":"ok","client_id":%s}'


class TestUnstorableText:
    """A lone surrogate killed the store writer thread (every later write was lost) and NUL,
    NaN or infinity made PostgreSQL drop a write (an ACKed session could vanish). Frames with
    them are refused as invalid payload now."""

    @pytest.mark.parametrize(
        "text",
        [
            HEARTBEAT % '"a\\u0000b"',
            HEARTBEAT % '"\\ud800"',
            '{"type":"task","status":"continue","request":"x\\udfff"}',
            '{"type":"heartbeat","status":"ok","metadata":{"\\u0000":1}}',
            '{"type":"heartbeat","status":"ok","metadata":{"x":NaN}}',
            '{"type":"heartbeat","status":"ok","metadata":{"x":-Infinity}}',
            '{"type":"heartbeat","status":"ok","metadata":{"x":1e999}}',
            '{"type":"heartbeat","status":"ok","metadata":'
            + "[" * 900
            + '"\\u0000"'
            + "]" * 900
            + "}",
        ],
    )
    def test_frame_with_unstorable_value_is_invalid_payload(self, text: str) -> None:
        """NUL, lone surrogates and non-finite numbers anywhere in a frame: FrameError 1007."""
        with pytest.raises(FrameError) as caught:
            decode_client_message(text)
        assert caught.value.close_code == CLOSE_INVALID_PAYLOAD

    @pytest.mark.parametrize(
        "text", [HEARTBEAT % '"a\\ud83d\\ude00"', HEARTBEAT % '"a\\\\u0000"', HEARTBEAT % '"1e999"']
    )
    def test_lookalikes_are_accepted(self, text: str) -> None:
        """A surrogate pair, an escaped backslash, a number inside a string: all fine."""
        assert decode_client_message(text).client_id is not None

    def test_writer_survives_a_value_the_driver_cannot_encode(self, engine: Engine) -> None:
        """The bad write is dropped and counted; the writer thread lives on and commits the next."""
        writer = StoreWriter(engine)
        writer.start()
        try:
            writer.submit(
                Write("system_info", params={"p_client_id": "\ud800", "p_system_info": None})
            )
            writer.submit(Write("run_stopped", params={"p_run_id": "none", "p_at": None}))
            writer.flush().result(20)
            assert writer.running
            assert writer._thread is not None
            assert writer._thread.is_alive()
            assert writer.stats().writes_failed == 1
        finally:
            writer.stop()


class TestStalledDatabase:
    """A database that blocks instead of failing (a lock held by another process, a port that
    drops packets) raised nothing for up to 30 s, so /api/health said `healthy` while writes
    piled up, and sessions waited for a durable point that could not come."""

    def test_stalled_commit_makes_the_writer_degraded_and_refuse_sessions(
        self, tmp_path: Path, sqlite_template: Path
    ) -> None:
        """With another connection holding BEGIN EXCLUSIVE, the writer is degraded after
        `stall_after` and reserve() refuses new sessions; both clear when the lock goes."""
        path = tmp_path / "locked.db"
        path.write_bytes(sqlite_template.read_bytes())
        engine = make_engine(f"sqlite:///{path}")
        writer = StoreWriter(engine, stall_after=0.2)
        writer.start()
        locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            writer.submit(Write("run_stopped", params={"p_run_id": "none", "p_at": None}))
            done = writer.flush()
            for _ in range(100):
                if writer.degraded:
                    break
                threading.Event().wait(0.05)
            assert writer.degraded
            assert writer.stats().degraded
            assert "waited" in (writer.stats().last_error or "")
            with pytest.raises(StoreUnavailable, match="new sessions are refused"):
                writer.reserve()
            locker.execute("ROLLBACK")
            done.result(30)
            assert not writer.degraded
            writer.reserve()
        finally:
            locker.close()
            writer.stop()
            engine.dispose()


class _SlowSocket:
    """Stands in for a WebSocket whose sends complete only when the test says so."""

    application_state = None

    def __init__(self) -> None:
        self.pending: asyncio.Future[None] | None = None

    async def send_text(self, text: str) -> None:
        self.pending = asyncio.get_running_loop().create_future()
        await self.pending


class TestSenderStop:
    """On Python 3.11, a cancel that lands while a send completes is swallowed by wait_for; the
    sender then waited on its outbox forever, and with it the disconnect (sessions never ended,
    the other side never told, shutdown stuck)."""

    def test_stop_sender_returns_when_its_cancel_meets_a_finishing_send(self) -> None:
        """stop_sender finishes although its cancel was swallowed."""

        async def scenario() -> None:
            socket = _SlowSocket()
            peer = Peer(
                websocket=socket,  # type: ignore[arg-type]
                client_id="c",
                client_type=ClientType.DEVICE,
                remote_address=None,
                send_timeout=30,
            )
            peer.send("frame")
            for _ in range(100):
                if socket.pending is not None:
                    break
                await asyncio.sleep(0.01)
            assert socket.pending is not None
            socket.pending.set_result(None)  # the send completes in the same step...
            await asyncio.wait_for(peer.stop_sender(), 5)  # ...as the cancel arrives

        asyncio.run(scenario())


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(make_settings(database_url, tmp_path / "data")).start()
    yield thread
    thread.stop()


async def _raw(server: ServerThread) -> RawWs:
    return await RawWs.connect(server.port, API_KEY)


class TestCloseCodes:
    """After 20 bad frames the connection was closed with 1000 instead of 1007 (the endpoint's
    own close overtook the kick's), and closes made by uvicorn itself for invalid UTF-8 or
    broken framing were recorded as `connection_lost`."""

    def test_twenty_bad_frames_close_with_1007_and_protocol_error(
        self, server: ServerThread
    ) -> None:
        """The close code is 1007 and the row says protocol_error."""

        async def scenario() -> int | None:
            ws = await _raw(server)
            await ws.register("bursty")
            for _ in range(20):
                ws.send_frame(OP_TEXT, b"{")
            await ws.writer.drain()
            try:
                while True:
                    await ws.recv(10)
            except Closed as closed:
                return closed.code
            finally:
                ws.abort()

        assert asyncio.run(scenario()) == 1007
        server.flush()
        self._wait_reason(server, "bursty", "protocol_error")

    def test_invalid_utf8_is_recorded_as_protocol_error(self, server: ServerThread) -> None:
        """uvicorn closes with 1007; ccm records protocol_error, not connection_lost."""

        async def scenario() -> int | None:
            ws = await _raw(server)
            await ws.register("utf8")
            await ws.send(OP_TEXT, b'{"x": "\xff"}')
            try:
                await ws.recv(10)
            except Closed as closed:
                return closed.code
            finally:
                ws.abort()
            return None

        assert asyncio.run(scenario()) == 1007
        self._wait_reason(server, "utf8", "protocol_error")

    @staticmethod
    def _wait_reason(server: ServerThread, client_id: str, reason: str) -> None:
        for _ in range(100):
            server.flush()
            with server.app.state.store.engine.connect() as conn:
                found = conn.execute(
                    select(connections.c.disconnect_reason).where(
                        connections.c.client_id == client_id
                    )
                ).scalar()
            if found is not None:
                assert found == reason
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"{client_id} still open")


class TestHttpInputs:
    """NUL in a path or query value, or an offset beyond 64 bits, was a 500 (PostgreSQL refuses
    NUL; both databases overflow); NUL in a dispatch body could make an acknowledged session
    vanish on PostgreSQL."""

    @pytest.mark.parametrize(
        "path",
        [
            "/api/sessions?device_id=a%00b",
            "/api/sessions/a%00b",
            "/api/clients/a%00b/connections",
            "/api/task_result/a%00b",
        ],
    )
    def test_nul_in_ids_and_filters_is_a_400(self, server: ServerThread, path: str) -> None:
        """400 with a reason, never a 500."""
        with server.http() as http:
            reply = http.get(path)
        assert reply.status_code == 400, reply.text
        assert "NUL" in reply.json()["detail"]

    def test_offset_beyond_the_bound_is_a_422(self, server: ServerThread) -> None:
        """Validated like any other query parameter."""
        with server.http() as http:
            reply = http.get("/api/sessions", params={"offset": 10**20})
        assert reply.status_code == 422

    def test_dispatch_with_unstorable_text_is_a_422(self, server: ServerThread) -> None:
        """The body is refused before any session exists."""
        with server.http() as http:
            reply = http.post("/api/dispatch", json={"client_id": "d", "request": "a\u0000b"})
        assert reply.status_code == 422


class TestLogLines:
    """Client text (error frames, ids) went into the log as is: a newline in it forged a log
    line of its own (CWE-117). uvicorn logged a client's invalid UTF-8 as an ERROR with a
    traceback, though it was handled."""

    def test_client_text_stays_on_one_line(self) -> None:
        """Newlines in a message argument or a bound id are escaped."""
        record = logging.LogRecord(
            "ccm.server.hub",
            logging.WARNING,
            __file__,
            1,
            "client reported error error=%s",
            ("x\n2026-01-01 00:00:00,000 ERROR   forged: line",),
            None,
        )
        record.ctx = {"client_id": "a\nb"}
        assert "\n" not in TextFormatter().format(record)

    def test_invalid_utf8_from_a_client_is_a_warning_without_traceback(self) -> None:
        """uvicorn's record is rewritten: WARNING, one line, no traceback."""
        try:
            b"\xff".decode()
        except UnicodeDecodeError:
            exc_info = sys.exc_info()
        record = logging.LogRecord(
            "uvicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Invalid UTF-8 sequence received from client.",
            (),
            exc_info,
        )
        assert HandledClientErrors().filter(record)
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
