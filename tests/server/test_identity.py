"""A client's id and role are bound at REGISTER, on a real server: a second live connection with
the same id is refused (or, with the takeover policy, replaces the first), and a frame that claims
another client's id or role is refused without effect."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.server.scenario import (
    answer,
    assert_full_frame,
    assert_ok_frame,
    assert_quiet,
    client_row,
    closed_connection,
    closed_with,
    connect_constellation,
    connect_device,
    connection_rows,
    connections_in_sql,
    device,
    expect_close,
    expect_error,
    expect_refused_task,
    send_task,
    sessions_in_sql,
)
from tests.server.support import ServerThread, open_client, run

# -- duplicate client ids -------------------------------------------------------------------------


class TestDuplicateClientId:
    def test_duplicate_is_rejected_and_first_connection_keeps_working(
        self, server: ServerThread
    ) -> None:
        """Default policy: the newcomer gets ERROR then close 1008; the live client is untouched."""

        async def scenario() -> None:
            first = await device(server, "lab-pc-07")
            second = await open_client(server)
            refusal = await second.register_device("lab-pc-07")
            assert_full_frame(refusal)
            assert (refusal["type"], refusal["status"]) == ("error", "error")
            assert "already registered" in refusal["error"]
            code, _reason = await closed_with(second)
            assert code == 1008
            await first.send(type="heartbeat", client_id="lab-pc-07")
            assert_ok_frame(await first.recv())
            assert server.registry.is_online("lab-pc-07")

        run(scenario())
        # Only the first connection has a row, and it ended when that client closed.
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "closed"

    def test_takeover_policy_replaces_the_old_connection(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """With takeover the old socket is closed ("replaced"); its late close keeps the new one."""
        server = server_factory(duplicate_policy="takeover")
        hub = server.app.state.hub
        finished: list[tuple[int, str]] = []
        done = threading.Event()
        original = hub.disconnect

        async def recording_disconnect(peer: Any, reason: str) -> None:
            await original(peer, reason)
            finished.append((peer.epoch, reason))
            done.set()

        hub.disconnect = recording_disconnect

        async def scenario() -> None:
            old = await device(server, "lab-pc-07")
            old_epoch = server.registry.get_client_info("lab-pc-07").epoch
            new = await open_client(server)
            assert_ok_frame(await new.register_device("lab-pc-07"))
            code, reason = await closed_with(old)
            assert (code, reason) == (1008, "replaced")
            await asyncio.to_thread(done.wait, 10)  # the old socket's own cleanup has run
            assert finished[0] == (old_epoch, "replaced")
            await new.send(type="heartbeat", client_id="lab-pc-07")
            assert_ok_frame(await new.recv())
            info = server.registry.get_client_info("lab-pc-07")
            assert info is not None
            assert info.epoch != old_epoch
            old_row, new_row = connection_rows(server, "lab-pc-07")
            assert old_row.disconnect_reason == "replaced"
            assert old_row.disconnected_at is not None
            assert new_row.disconnected_at is None
            row = client_row(server, "lab-pc-07")
            assert row["online"] is True
            assert row["current_connection_id"] == new_row.connection_id

        run(scenario())


# -- 6.2 duplicate client_id -----------------------------------------------------------------


class TestDuplicateId:
    def test_second_registration_of_a_live_id_is_refused(self, server: ServerThread) -> None:
        """ERROR then close 1008 for the newcomer; the live device keeps its entry and its work."""

        async def scenario() -> None:
            original = await connect_device(server, "dev-a", hostname="original")
            before = server.registry.get_client_info("dev-a")
            impostor = await open_client(server)
            await impostor.send(
                type="register",
                client_id="dev-a",
                metadata={"platform": "linux", "system_info": {"hostname": "impostor"}},
            )
            await expect_error(impostor, "client_id 'dev-a' is already registered")
            assert await expect_close(impostor) == 1008

            after = server.registry.get_client_info("dev-a")
            assert after is before
            assert after.platform == "windows"
            assert server.registry.get_device_system_info("dev-a")["hostname"] == "original"
            rows = await connections_in_sql(server, "dev-a")
            assert [r.connection_id for r in rows] == [before.connection_id]
            assert rows[0].disconnected_at is None

            # The original still gets its own frames: a task's COMMAND goes to it.
            await assert_quiet(original)
            owner = await connect_constellation(server, "c@dev-a", "dev-a")
            await send_task(owner, target_id="dev-a", session_id="c@task_1")
            command = await original.recv_type("command")
            await answer(original, command, "ran on the original")
            end = await owner.recv_type("task_end")
            assert end["status"] == "completed"
            assert end["result"][0]["result"] == "ran on the original"
            await owner.close()
            await original.close()

        run(scenario())

    def test_a_constellation_cannot_take_a_live_device_id(self, server: ServerThread) -> None:
        """Registering a live device's id as a constellation (a role change) is refused too."""

        async def scenario() -> None:
            original = await connect_device(server, "dev-a")
            impostor = await open_client(server)
            await impostor.send(
                type="register", client_type="constellation", client_id="dev-a", target_id="dev-a"
            )
            await expect_error(impostor, "already registered")
            assert await expect_close(impostor) == 1008
            assert server.registry.is_device_connected("dev-a")
            await assert_quiet(original)
            await original.close()

        run(scenario())


# -- 6.3 identity and role spoofing ----------------------------------------------------------


class TestSpoofing:
    def test_device_claiming_the_constellation_role_cannot_task_another_device(
        self, server: ServerThread
    ) -> None:
        """A device's TASK claiming `constellation` is refused; nothing runs anywhere."""

        async def scenario() -> None:
            attacker = await connect_device(server, "dev-a")
            victim = await connect_device(server, "dev-b")
            await send_task(attacker, target_id="dev-b", session_id="spoof@task_1")
            await expect_refused_task(
                attacker, "spoof@task_1", "client_type does not match the registered connection"
            )
            await assert_quiet(attacker, victim)
            assert await sessions_in_sql(server) == []
            assert server.app.state.sessions.live_sessions() == []

        run(scenario())

    def test_device_claiming_another_client_id_cannot_task(self, server: ServerThread) -> None:
        """A TASK whose `client_id` is another live device is refused; nothing runs."""

        async def scenario() -> None:
            attacker = await connect_device(server, "dev-a")
            victim = await connect_device(server, "dev-b")
            await send_task(
                attacker,
                target_id=None,
                session_id="spoof@task_2",
                client_type="device",
                client_id="dev-b",
            )
            await expect_refused_task(
                attacker, "spoof@task_2", "client_id does not match the registered connection"
            )
            await assert_quiet(attacker, victim)
            assert await sessions_in_sql(server) == []

        run(scenario())

    def test_device_may_not_target_another_device(self, server: ServerThread) -> None:
        """A device TASK (correct role and id) naming another device as target is refused."""

        async def scenario() -> None:
            attacker = await connect_device(server, "dev-a")
            victim = await connect_device(server, "dev-b")
            await send_task(
                attacker, target_id="dev-b", session_id="spoof@task_3", client_type="device"
            )
            await expect_refused_task(
                attacker, "spoof@task_3", "Device clients may not target other devices"
            )
            await assert_quiet(attacker, victim)
            assert await sessions_in_sql(server) == []

        run(scenario())

    @pytest.mark.parametrize(
        "fields",
        [
            {"type": "heartbeat"},
            {"type": "device_info_request", "target_id": "dev-b", "request_id": "r1"},
            {"type": "command_results", "session_id": "s", "prev_response_id": "p"},
            {"type": "task_end", "status": "completed", "session_id": "s"},
        ],
        ids=["heartbeat", "device_info_request", "command_results", "task_end"],
    )
    def test_frame_claiming_another_client_id_is_refused(
        self, server: ServerThread, fields: dict[str, Any]
    ) -> None:
        """Any frame whose `client_id` differs from the registered one gets ERROR and no effect."""

        async def scenario() -> None:
            attacker = await connect_constellation(server, "c@dev-a", None)
            victim = await connect_device(server, "dev-b")
            await attacker.send(client_type="constellation", client_id="dev-b", **fields)
            reply = await expect_error(
                attacker, "client_id does not match the registered connection"
            )
            assert "dev-b" not in json.dumps(reply)
            await assert_quiet(attacker, victim)
            assert server.registry.get_client_type("dev-b").value == "device"

        run(scenario())
