"""Clients leaving a real server, on SQLite and Postgres: a constellation's sessions are
cancelled and a device's fail, the other side is told once, and each connection row records how
it ended (closed, connection_lost, heartbeat_timeout)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from ccm.server.orchestrator import CONSTELLATION_GONE_ERROR, DEVICE_GONE_ERROR
from tests.server.scenario import (
    CLICK,
    ODD_SESSION_ID,
    client_row,
    closed_connection,
    closed_with,
    constellation,
    device,
    one_session,
    plan,
    send_task,
)
from tests.server.support import ServerThread, run
from tests.support import wait_until


class TestDisconnect:
    def test_constellation_gone_cancels_its_sessions_and_tells_device(
        self, server: ServerThread
    ) -> None:
        """Constellation closes: its session is cancelled and the device gets task_end failed."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07", relay=True)
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Long job.")
            await con.recv()  # ACK
            await dev.recv()  # the task
            await con.close()
            end = await dev.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "failed",
                ODD_SESSION_ID,
            )
            assert end["error"] == CONSTELLATION_GONE_ERROR

        run(scenario())
        assert server.registry.session_count() == 0
        row = one_session(server, ODD_SESSION_ID)
        assert (row.state, row.reason) == ("cancelled", "constellation_disconnected")
        assert row.ended_at is not None
        assert closed_connection(server, "nightly@lab-pc-07").disconnect_reason == "closed"
        assert client_row(server, "nightly@lab-pc-07")["online"] is False

    def test_device_gone_fails_sessions_and_tells_constellation(self, server: ServerThread) -> None:
        """Device closes: its session fails (device_disconnected), the constellation is told."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07", relay=True)
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Long job.")
            await con.recv()  # ACK
            await dev.recv()  # the task
            await dev.close()
            end = await con.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "failed",
                ODD_SESSION_ID,
            )
            assert end["error"] == DEVICE_GONE_ERROR

        run(scenario())
        assert server.registry.session_count() == 0
        row = one_session(server, ODD_SESSION_ID)
        assert (row.state, row.reason, row.error) == (
            "failed",
            "device_disconnected",
            DEVICE_GONE_ERROR,
        )
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "closed"
        assert client_row(server, "lab-pc-07")["online"] is False

    def test_device_dropped_without_close_frame_is_connection_lost(
        self, server: ServerThread
    ) -> None:
        """A device whose TCP connection just drops is recorded as connection_lost."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07", relay=True)
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_11", "Long job.")
            await con.recv()  # ACK
            await dev.recv()  # the task
            dev.ws.transport.abort()
            end = await con.recv()
            assert (end["status"], end["error"]) == ("failed", DEVICE_GONE_ERROR)

        run(scenario())
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "connection_lost"
        row = one_session(server, "nightly@task_11")
        assert (row.state, row.reason) == ("failed", "device_disconnected")

    def test_device_gone_during_command_fails_agent_session(self, server: ServerThread) -> None:
        """A device that leaves while a COMMAND waits ends the session as device_disconnected."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_6", plan(CLICK))
            await con.recv()  # ACK
            await dev.recv()  # the COMMAND, never answered
            await dev.close()
            end = await con.recv()
            assert (end["status"], end["error"]) == ("failed", DEVICE_GONE_ERROR)

        run(scenario())
        row = one_session(server, "nightly@task_6")
        assert (row.state, row.reason) == ("failed", "device_disconnected")

    def test_both_gone_ends_each_session_once(
        self, server: ServerThread, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Constellation and device leave together: one row and one end per session."""
        caplog.set_level(logging.INFO, logger="ccm.sessions")
        session_ids = ["nightly@task_7", "nightly@task_8/ü"]

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07", relay=True)
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            for session_id in session_ids:
                await send_task(con, "lab-pc-07", session_id, "Long job.")
                await con.recv()  # ACK
                await dev.recv()  # the task
            await asyncio.gather(con.close(), dev.close())

        run(scenario())
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "closed"
        assert closed_connection(server, "nightly@lab-pc-07").disconnect_reason == "closed"
        wait_until(lambda: server.registry.session_count() == 0, what="sessions to end")
        for session_id in session_ids:
            row = one_session(server, session_id)
            assert (row.state, row.reason) in {
                ("cancelled", "constellation_disconnected"),
                ("failed", "device_disconnected"),
            }
            assert row.ended_at is not None
            ends = [
                r
                for r in caplog.records
                if r.name == "ccm.sessions"
                and r.getMessage().startswith(f"session ended session_id={session_id} ")
            ]
            assert len(ends) == 1, [r.getMessage() for r in ends]
        assert len(server.app.state.sessions) == 0


def test_silent_client_is_closed_on_heartbeat_timeout(
    server_factory: Callable[..., ServerThread],
) -> None:
    """Silence for 1.5x server.heartbeat_interval closes the client; its sessions fail as gone."""
    server = server_factory(**{"server.heartbeat_interval": "1s"})

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")

        async def keep_alive() -> None:
            while True:
                await con.send(type="heartbeat", client_id="nightly@lab-pc-07")
                await asyncio.sleep(0.3)

        await send_task(con, "lab-pc-07", "nightly@task_10", "Long job.")
        await con.recv()  # ACK
        await dev.recv()  # the task; the device now stays silent
        beating = asyncio.create_task(keep_alive())
        try:
            code, reason = await closed_with(dev, timeout=10)
            end = await con.recv_type("task_end", timeout=10)
        finally:
            beating.cancel()
        assert (code, reason) == (1008, "heartbeat_timeout")
        assert con.ws.close_code is None  # the constellation kept heartbeating and was not closed
        assert (end["status"], end["session_id"], end["error"]) == (
            "failed",
            "nightly@task_10",
            DEVICE_GONE_ERROR,
        )

    run(scenario())
    assert closed_connection(server, "lab-pc-07").disconnect_reason == "heartbeat_timeout"
    row = one_session(server, "nightly@task_10")
    assert (row.state, row.reason) == ("failed", "device_disconnected")
    assert closed_connection(server, "nightly@lab-pc-07").disconnect_reason == "closed"
