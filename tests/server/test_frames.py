"""Frames a real server refuses: oversized ones close with 1009; binary, malformed or unknown
ones get an ERROR and the connection survives until too many come in a row; a bad first frame,
or none within the register timeout, gets an ERROR and a close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from ccm.server.ws import MAX_CONSECUTIVE_BAD_FRAMES
from ccm.store.models import connections
from tests.server.scenario import (
    PLAN,
    assert_quiet,
    connect_device,
    connections_in_sql,
    count_rows,
    expect_close,
    sessions_in_sql,
)
from tests.server.support import ServerThread, open_client, run
from tests.support import wait_until


class TestFrames:
    def test_oversized_frame_closes_with_1009(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """A frame above `server.max_frame_bytes` closes the connection with 1009, recorded."""
        server = server_factory(**{"server.max_frame_bytes": 65536})

        async def scenario() -> None:
            device = await connect_device(server, "dev-big")
            await device.send(type="heartbeat", client_id="dev-big", padding="x" * 70_000)
            assert await expect_close(device) == 1009
            await asyncio.to_thread(
                wait_until,
                lambda: not server.registry.is_online("dev-big"),
                5,
                "dev-big to go offline",
            )
            (row,) = await connections_in_sql(server, "dev-big")
            assert row.disconnect_reason == "frame_too_large"
            assert row.disconnected_at is not None

        run(scenario())

    def test_frame_just_under_the_limit_is_accepted(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """A frame below the limit is handled normally."""
        server = server_factory(**{"server.max_frame_bytes": 65536})

        async def scenario() -> None:
            device = await connect_device(server, "dev-big")
            await device.send(type="heartbeat", client_id="dev-big", padding="x" * 60_000)
            reply = await device.recv()
            assert (reply["type"], reply["status"]) == ("heartbeat", "ok")

        run(scenario())

    @pytest.mark.parametrize(
        "payload",
        [
            json.dumps({"type": "heartbeat", "status": "ok"}).encode(),
            "{not json",
            "[1, 2]",
            json.dumps({"type": "heartbeat"}),
            json.dumps({"type": "no_such_type", "status": "ok"}),
            json.dumps({"type": "heartbeat", "status": "OK"}),
        ],
        ids=["binary", "malformed", "not-object", "no-status", "bad-type", "bad-status"],
    )
    def test_bad_frame_after_registration_gets_error_and_connection_survives(
        self, server: ServerThread, payload: str | bytes
    ) -> None:
        """Binary or malformed frames get an ERROR; the connection stays registered and usable."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            await device.ws.send(payload)
            reply = await device.recv()
            assert (reply["type"], reply["status"]) == ("error", "error")
            await assert_quiet(device)
            assert server.registry.is_device_connected("dev-1")

        run(scenario())

    def test_a_stream_of_bad_frames_closes_the_connection(self, server: ServerThread) -> None:
        """Twenty malformed frames in a row: an ERROR each, then close 1007 (`protocol_error`)."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            for _ in range(MAX_CONSECUTIVE_BAD_FRAMES):
                await device.ws.send("{not json")
            for _ in range(MAX_CONSECUTIVE_BAD_FRAMES):
                assert (await device.recv())["type"] == "error"
            assert await expect_close(device) == 1007
            await asyncio.to_thread(
                wait_until, lambda: not server.registry.is_online("dev-1"), 5, "dev-1 to go offline"
            )
            (row,) = await connections_in_sql(server, "dev-1")
            assert row.disconnect_reason == "protocol_error"

        run(scenario())

    def test_a_good_frame_resets_the_bad_frame_count(self, server: ServerThread) -> None:
        """Bad frames separated by good ones never close the connection."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            for _ in range(MAX_CONSECUTIVE_BAD_FRAMES + 5):
                await device.ws.send("{not json")
                assert (await device.recv())["type"] == "error"
                await assert_quiet(device)
            assert server.registry.is_device_connected("dev-1")

        run(scenario())

    def test_client_error_frames_are_not_echoed(self, server: ServerThread) -> None:
        """A client's ERROR frame is logged, not answered."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            await device.send(type="error", status="error", client_id="dev-1", error="boom")
            await assert_quiet(device)

        run(scenario())

    @pytest.mark.parametrize(
        ("payload", "code"),
        [
            (json.dumps({"type": "heartbeat", "status": "ok", "client_id": "dev-1"}), 1008),
            (
                json.dumps(
                    {"type": "task", "status": "continue", "client_id": "dev-1", "request": PLAN}
                ),
                1008,
            ),
            ("{not json", 1007),
            (json.dumps({"type": "register", "client_id": "dev-1"}), 1007),
            (json.dumps({"type": "register", "status": "ok", "client_id": "dev-1"}).encode(), 1007),
            (json.dumps({"type": "register", "status": "ok", "client_id": " "}), 1008),
        ],
        ids=["heartbeat", "task", "malformed", "no-status", "binary", "blank-id"],
    )
    def test_bad_first_frame_gets_error_then_close(
        self, server: ServerThread, payload: str | bytes, code: int
    ) -> None:
        """A first frame that is not a valid REGISTER: ERROR, then close (1008 policy, 1007
        malformed); nothing is registered or stored."""

        async def scenario() -> None:
            client = await open_client(server)
            await client.ws.send(payload)
            reply = await client.recv()
            assert (reply["type"], reply["status"]) == ("error", "error")
            assert await expect_close(client) == code
            assert server.registry.list_clients() == []
            assert await count_rows(server, connections) == 0
            assert await sessions_in_sql(server) == []

        run(scenario())

    def test_connection_that_never_registers_is_closed(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """No REGISTER within `server.register_timeout`: ERROR, then close 1008."""
        server = server_factory(**{"server.register_timeout": "1s"})

        async def scenario() -> None:
            client = await open_client(server)
            reply = await client.recv(timeout=10)
            assert reply["type"] == "error"
            assert "REGISTER expected within 1 s" in reply["error"]
            assert await expect_close(client) == 1008
            assert server.registry.list_clients() == []

        run(scenario())
