"""What a constellation may reach, on a real server: tasks and device info only for the device it
registered for (or any, when `server.allow_unscoped_constellations` grants it); a refused TASK
gets an ERROR and a task_end failed, and the other device receives nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.server.scenario import (
    CLICK,
    ODD_SESSION_ID,
    assert_full_frame,
    assert_quiet,
    connect_constellation,
    connect_device,
    constellation,
    device,
    expect_error,
    expect_refused_task,
    plan,
    send_task,
    session_rows,
    sessions_in_sql,
)
from tests.server.support import AipClient, ServerThread, run
from tests.support import wait_until


@pytest.mark.parametrize(
    ("target_id", "error"),
    [
        ("lab-pc-08", "Not authorized to send tasks to device 'lab-pc-08'"),
        (
            "lab-pc-07",
            "Target device 'lab-pc-07' is not connected; it is the only device this "
            "constellation may use (its target_id)",
        ),
    ],
    ids=["other-device", "device-gone"],
)
def test_refused_task_gets_error_and_task_end_failed(
    server: ServerThread, target_id: str, error: str
) -> None:
    """Decision D4: a refused TASK gets an ERROR and a task_end failed with its session id."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07")
        await device(server, "lab-pc-08")
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await dev.close()
        await asyncio.to_thread(
            wait_until, lambda: not server.registry.is_online("lab-pc-07"), what="device to leave"
        )
        await send_task(con, target_id, ODD_SESSION_ID, plan(CLICK))
        refusal = await con.recv()
        assert (refusal["type"], refusal["error"]) == ("error", error)
        end = await con.recv()
        assert_full_frame(end)
        assert (end["type"], end["status"], end["session_id"]) == (
            "task_end",
            "failed",
            ODD_SESSION_ID,
        )
        assert (end["error"], end["result"]) == (error, None)

    run(scenario())
    assert session_rows(server, ODD_SESSION_ID) == []
    assert server.registry.session_count() == 0


# -- 6.7 device-information disclosure -------------------------------------------------------


def info_request(client: AipClient, target_id: str, request_id: str, role: str) -> dict[str, Any]:
    return {
        "type": "device_info_request",
        "client_type": role,
        "client_id": client.client_id,
        "target_id": target_id,
        "request_id": request_id,
    }


class TestDeviceInfo:
    def test_a_device_may_not_ask(self, server: ServerThread) -> None:
        """DEVICE_INFO_REQUEST from a device is refused with no device data."""

        async def scenario() -> None:
            asker = await connect_device(server, "dev-1")
            await connect_device(server, "dev-2", hostname="secret-host-2", ip_address="10.9.9.9")
            await asker.send(**info_request(asker, "dev-2", "r1", "device"))
            reply = await expect_error(asker, "permitted only for constellation clients")
            assert "secret-host-2" not in json.dumps(reply)
            await assert_quiet(asker)

        run(scenario())

    def test_a_scoped_constellation_sees_only_its_target(self, server: ServerThread) -> None:
        """A constellation registered for dev-1 gets dev-1's info and an ERROR for dev-2."""

        async def scenario() -> None:
            await connect_device(server, "dev-1", hostname="host-1")
            other = await connect_device(server, "dev-2", hostname="secret-host-2")
            asker = await connect_constellation(server, "c@dev-1", "dev-1")
            await asker.send(**info_request(asker, "dev-2", "r1", "constellation"))
            reply = await expect_error(asker, "Not authorized to request device info")
            assert "secret-host-2" not in json.dumps(reply)
            await asker.send(**info_request(asker, "dev-1", "r2", "constellation"))
            reply = await asker.recv()
            assert (reply["type"], reply["status"], reply["response_id"]) == (
                "device_info_response",
                "ok",
                "r2",
            )
            assert reply["result"]["hostname"] == "host-1"
            await assert_quiet(asker, other)

        run(scenario())

    def test_an_unscoped_constellation_is_refused_by_default(self, server: ServerThread) -> None:
        """A constellation registered without a target gets no device info by default."""

        async def scenario() -> None:
            await connect_device(server, "dev-1", hostname="secret-host-1")
            asker = await connect_constellation(server, "c@any", None)
            await asker.send(**info_request(asker, "dev-1", "r1", "constellation"))
            reply = await expect_error(asker, "Not authorized to request device info")
            assert "secret-host-1" not in json.dumps(reply)

        run(scenario())

    def test_an_unscoped_constellation_may_ask_when_granted(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """With `server.allow_unscoped_constellations` an untargeted constellation gets the info."""
        server = server_factory(**{"server.allow_unscoped_constellations": True})

        async def scenario() -> None:
            await connect_device(server, "dev-1", hostname="host-1")
            asker = await connect_constellation(server, "c@any", None)
            await asker.send(**info_request(asker, "dev-1", "r1", "constellation"))
            reply = await asker.recv()
            assert (reply["type"], reply["response_id"]) == ("device_info_response", "r1")
            assert reply["result"]["hostname"] == "host-1"

        run(scenario())


# -- 6.10 task targeting beyond the declared device ------------------------------------------


class TestTaskScope:
    def test_constellation_cannot_task_a_device_it_did_not_declare(
        self, server: ServerThread
    ) -> None:
        """Registered for dev-1, a TASK for dev-2 is refused (ERROR + TASK_END failed); dev-2
        receives nothing."""

        async def scenario() -> None:
            await connect_device(server, "dev-1")
            victim = await connect_device(server, "dev-2")
            owner = await connect_constellation(server, "n@dev-1", "dev-1")
            await send_task(owner, target_id="dev-2", session_id="n@task_9")
            await expect_refused_task(
                owner, "n@task_9", "Not authorized to send tasks to device 'dev-2'"
            )
            await assert_quiet(owner, victim)
            assert await sessions_in_sql(server) == []

        run(scenario())

    def test_unscoped_constellation_cannot_task_by_default(self, server: ServerThread) -> None:
        """A constellation registered without a target cannot send tasks by default."""

        async def scenario() -> None:
            victim = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "n@any", None)
            await send_task(owner, target_id="dev-1", session_id="n@task_1")
            await expect_refused_task(owner, "n@task_1", "Not authorized to send tasks")
            await assert_quiet(victim)
            assert await sessions_in_sql(server) == []

        run(scenario())

    def test_unscoped_constellation_may_task_when_granted(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """With `server.allow_unscoped_constellations` the same TASK runs on the device."""
        server = server_factory(**{"server.allow_unscoped_constellations": True})

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "n@any", None)
            await send_task(owner, target_id="dev-1", session_id="n@task_1")
            command = await device.recv_type("command")
            assert command["session_id"] == "n@task_1"

        run(scenario())
