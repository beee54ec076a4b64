"""Attack classes 6.1 to 6.13 of the AIP reference, each against a real server: every test proves
the refusal and that the refused frame or request had no effect (registry, other clients, SQL).

"Receives nothing" is checked without sleeping: a client sends a HEARTBEAT and the ack must be the
next frame it reads. Frames of one connection are handled in order and each peer's outbox is FIFO,
so anything queued for it earlier would arrive first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from ccm.server.ws import MAX_CONSECUTIVE_BAD_FRAMES
from ccm.store.models import clients, connections
from tests.server.scenario import (
    PLAN,
    answer,
    assert_quiet,
    connect_constellation,
    connect_device,
    connections_in_sql,
    count_rows,
    expect_close,
    expect_error,
    expect_refused_task,
    send_task,
    sessions_in_sql,
)
from tests.server.support import API_KEY, AipClient, ServerThread, open_client, run
from tests.support import wait_until

# -- helpers ---------------------------------------------------------------------------------


def token_url(server: ServerThread, token: str | None) -> str:
    base = f"ws://127.0.0.1:{server.port}/ws"
    return base if token is None else f"{base}?token={token}"


# -- 6.1 unauthenticated access --------------------------------------------------------------


class TestUnauthenticated:
    @pytest.mark.parametrize("token", [None, "", "wrong-key", API_KEY + "x", API_KEY[:-1]])
    def test_websocket_without_the_key_is_refused_before_the_upgrade(
        self, server: ServerThread, token: str | None
    ) -> None:
        """A missing or wrong token gets HTTP 403 on the upgrade; no client, no connection row."""

        async def scenario() -> None:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(token_url(server, token))
            assert info.value.response.status_code == 403
            assert server.registry.list_clients() == []
            assert await count_rows(server, connections) == 0
            assert await count_rows(server, clients) == 0

        run(scenario())

    def test_http_without_a_key_is_401_on_every_api_route(self, server: ServerThread) -> None:
        """Every `/api/*` route answers 401 without X-API-Key, whatever the method."""
        routes = [
            (method.upper(), path.replace("{", "").replace("}", ""))
            for path, operations in server.app.openapi()["paths"].items()
            if path.startswith("/api/")
            for method in operations
        ]
        assert len(routes) >= 12
        with httpx.Client(base_url=server.http_url, timeout=10) as http:
            for method, path in routes:
                response = http.request(method, path, json={} if method == "POST" else None)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json() == {"detail": "Missing X-API-Key header"}

    def test_http_with_a_wrong_key_is_401_and_has_no_effect(self, server: ServerThread) -> None:
        """A wrong key gets 401 `Invalid API key`; a dispatch with it starts nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-a")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": "wrong"}, timeout=10
            ) as http:
                for path in ("/api/health", "/api/clients", "/api/sessions"):
                    response = await http.get(path)
                    assert response.status_code == 401
                    assert response.json() == {"detail": "Invalid API key"}
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-a", "request": PLAN}
                )
                assert response.status_code == 401
                assert response.json() == {"detail": "Invalid API key"}
            await assert_quiet(device)
            assert await sessions_in_sql(server) == []
            await device.close()

        run(scenario())

    def test_healthz_needs_no_key_and_shows_nothing(self, server: ServerThread) -> None:
        """`/healthz` answers without a key and reveals no key, client or database detail."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-secret-name")
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                response = await http.get("/healthz")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
            assert API_KEY not in response.text
            assert "dev-secret-name" not in response.text
            await device.close()

        run(scenario())


def test_no_key_or_token_in_logs(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """A registration and a refused token attempt leave neither token in any log message."""
    caplog.set_level(logging.INFO)
    wrong = "not-the-key-5f1c2a"

    async def scenario() -> None:
        device = await connect_device(server, "dev-logged")
        with pytest.raises(InvalidStatus):
            await websockets.connect(token_url(server, wrong))
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            await http.get("/api/health", headers={"X-API-Key": API_KEY})
            await http.get("/api/health", headers={"X-API-Key": wrong})
        await device.close()
        await asyncio.to_thread(
            wait_until,
            lambda: not server.registry.is_online("dev-logged"),
            5,
            "dev-logged to go offline",
        )

    run(scenario())
    messages = [record.getMessage() for record in caplog.records]
    assert any("client registered client_id=dev-logged" in m for m in messages)
    assert any("refused websocket" in m for m in messages)
    for message in messages:
        assert API_KEY not in message
        assert wrong not in message


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


# -- 6.4 cross-client response confusion -----------------------------------------------------


def test_replies_go_only_to_the_connection_that_asked(server: ServerThread) -> None:
    """Two constellations each get only their own replies; a client joining in between gets only
    its confirmation."""

    async def scenario() -> None:
        dev_1 = await connect_device(server, "dev-1", hostname="host-1")
        dev_2 = await connect_device(server, "dev-2", hostname="host-2")
        c_1 = await connect_constellation(server, "n@dev-1", "dev-1")
        c_2 = await connect_constellation(server, "n@dev-2", "dev-2")

        await c_1.send(
            type="device_info_request",
            client_type="constellation",
            client_id="n@dev-1",
            target_id="dev-1",
            request_id="info-1",
        )
        await send_task(c_1, target_id="dev-1", session_id="n@task_1")
        # A third client connects while c_1's frames are in flight.
        third = await open_client(server)
        confirmation = await third.register_constellation("other@dev-2", "dev-2")
        assert (confirmation["type"], confirmation["status"]) == ("heartbeat", "ok")
        assert confirmation["session_id"] is None
        assert confirmation["result"] is None
        await c_2.send(
            type="device_info_request",
            client_type="constellation",
            client_id="n@dev-2",
            target_id="dev-2",
            request_id="info-2",
        )
        await send_task(c_2, target_id="dev-2", session_id="n@task_2")

        info_1 = await c_1.recv_type("device_info_response")
        assert (info_1["response_id"], info_1["result"]["hostname"]) == ("info-1", "host-1")
        ack_1 = await c_1.recv()
        assert (ack_1["type"], ack_1["session_id"]) == ("heartbeat", "n@task_1")
        info_2 = await c_2.recv_type("device_info_response")
        assert (info_2["response_id"], info_2["result"]["hostname"]) == ("info-2", "host-2")
        ack_2 = await c_2.recv()
        assert (ack_2["type"], ack_2["session_id"]) == ("heartbeat", "n@task_2")

        command_1 = await dev_1.recv_type("command")
        command_2 = await dev_2.recv_type("command")
        assert (command_1["session_id"], command_2["session_id"]) == ("n@task_1", "n@task_2")
        await answer(dev_2, command_2, "two")
        await answer(dev_1, command_1, "one")
        end_1 = await c_1.recv_type("task_end")
        end_2 = await c_2.recv_type("task_end")
        assert (end_1["session_id"], end_1["result"][0]["result"]) == ("n@task_1", "one")
        assert (end_2["session_id"], end_2["result"][0]["result"]) == ("n@task_2", "two")
        # Each device also got exactly its own TASK_END copy.
        assert (await dev_1.recv_type("task_end"))["session_id"] == "n@task_1"
        assert (await dev_2.recv_type("task_end"))["session_id"] == "n@task_2"
        await assert_quiet(c_1, c_2, dev_1, dev_2, third)

    run(scenario())


# -- 6.5 session ownership and id reuse ------------------------------------------------------


class TestSessionOwnership:
    def test_live_session_of_another_client_cannot_be_joined_or_replayed(
        self, server: ServerThread
    ) -> None:
        """B's TASK with A's running session id is refused: no ACK, none of A's results; after A's
        session ended B may reuse the id for a new run and never sees A's old result."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            a = await connect_constellation(server, "a@dev-1", "dev-1")
            b = await connect_constellation(server, "b@dev-1", "dev-1")
            await send_task(a, target_id="dev-1", session_id="shared@task_1")
            ack = await a.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "shared@task_1")
            command = await device.recv_type("command")

            await send_task(b, target_id="dev-1", session_id="shared@task_1")
            await expect_refused_task(
                b, "shared@task_1", "session_id 'shared@task_1' is owned by another client"
            )
            await assert_quiet(b, device)
            # A's bookkeeping is untouched by the refusal.
            assert server.registry.get_constellation_sessions("a@dev-1") == ["shared@task_1"]
            assert server.registry.get_device_sessions("dev-1") == ["shared@task_1"]
            assert server.registry.get_constellation_sessions("b@dev-1") == []

            await answer(device, command, "a-secret")
            end_a = await a.recv_type("task_end")
            assert (end_a["status"], end_a["result"][0]["result"]) == ("completed", "a-secret")
            await assert_quiet(b)
            (first,) = await sessions_in_sql(server, session_id="shared@task_1")
            assert (first.constellation_id, first.state) == ("a@dev-1", "completed")

            # The id is free again: B's reuse is a new run with its own row and result.
            await send_task(b, target_id="dev-1", session_id="shared@task_1")
            ack = await b.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "shared@task_1")
            command = await device.recv_type("command")
            await answer(device, command, "b-result")
            end_b = await b.recv_type("task_end")
            assert end_b["result"][0]["result"] == "b-result"
            assert "a-secret" not in json.dumps(end_b)
            await assert_quiet(a, b)
            rows = await sessions_in_sql(server, session_id="shared@task_1")
            assert len(rows) == 2
            assert rows[0].id != rows[1].id
            assert {(r.constellation_id, r.state) for r in rows} == {
                ("a@dev-1", "completed"),
                ("b@dev-1", "completed"),
            }
            newest = next(r for r in rows if r.constellation_id == "b@dev-1")
            assert newest.result[0]["result"] == "b-result"

        run(scenario())

    def test_owner_cannot_start_its_running_session_twice(self, server: ServerThread) -> None:
        """A second TASK with the owner's own running session id is refused; the run goes on."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            a = await connect_constellation(server, "a@dev-1", "dev-1")
            await send_task(a, target_id="dev-1", session_id="a@task_1")
            await a.recv()
            command = await device.recv_type("command")
            await send_task(a, target_id="dev-1", session_id="a@task_1")
            await expect_refused_task(a, "a@task_1", "already running")
            await assert_quiet(device)
            assert len(await sessions_in_sql(server, session_id="a@task_1")) == 1

            await answer(device, command, "once")
            end = await a.recv_type("task_end")
            assert (end["status"], end["result"][0]["result"]) == ("completed", "once")

        run(scenario())

    def test_a_device_cannot_claim_a_constellation_session(self, server: ServerThread) -> None:
        """A device's own TASK naming a constellation's running session id is refused."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "a@dev-1", "dev-1")
            await send_task(owner, target_id="dev-1", session_id="a@task_1")
            await owner.recv()
            command = await device.recv_type("command")
            await send_task(device, target_id=None, session_id="a@task_1", client_type="device")
            await expect_refused_task(device, "a@task_1", "owned by another client")
            await assert_quiet(owner)
            (row,) = await sessions_in_sql(server, session_id="a@task_1")
            assert (row.constellation_id, row.state) == ("a@dev-1", "running")
            await answer(device, command, "for a")
            end = await owner.recv_type("task_end")
            assert end["result"][0]["result"] == "for a"

        run(scenario())

    def test_an_http_dispatched_session_cannot_be_claimed(self, server: ServerThread) -> None:
        """A session without a constellation owner (HTTP dispatch) is refused to a constellation."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            c = await connect_constellation(server, "c@dev-1", "dev-1")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
            ) as http:
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-1", "request": PLAN}
                )
            session_id = response.json()["session_id"]
            command = await device.recv_type("command")
            await send_task(c, target_id="dev-1", session_id=session_id)
            await expect_refused_task(c, session_id, "owned by another client")
            await answer(device, command, "for the dispatcher")
            end = await device.recv_type("task_end")
            assert end["session_id"] == session_id
            await assert_quiet(c)

        run(scenario())


# -- 6.6 command-result injection ------------------------------------------------------------


def test_forged_command_results_have_no_effect(server: ServerThread) -> None:
    """COMMAND_RESULTS from a non-executor, for an unknown session or with a wrong
    prev_response_id are refused; the session still waits for and uses the real answer."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        other = await connect_device(server, "dev-2")
        owner = await connect_constellation(server, "c@dev-1", "dev-1")
        await send_task(owner, target_id="dev-1", session_id="c@task_1")
        await owner.recv()
        command = await device.recv_type("command")
        call_id = command["actions"][0]["call_id"]
        forged = [{"status": "success", "result": "forged", "call_id": call_id}]

        # Another device answering someone else's command.
        await other.send(
            type="command_results",
            status="continue",
            client_id="dev-2",
            session_id="c@task_1",
            prev_response_id=command["response_id"],
            action_results=forged,
        )
        await expect_error(other, "no such session on this device")
        # The owning constellation itself (its bound role is not device).
        await owner.send(
            type="command_results",
            status="continue",
            client_type="constellation",
            client_id="c@dev-1",
            session_id="c@task_1",
            prev_response_id=command["response_id"],
            action_results=forged,
        )
        await expect_error(owner, "no such session on this device")
        # The executor, for a session that does not exist (squatting a future id).
        for session_id in ("c@task_2", "unknown"):
            await device.send(
                type="command_results",
                status="continue",
                client_id="dev-1",
                session_id=session_id,
                prev_response_id=command["response_id"],
                action_results=forged,
            )
            await expect_error(device, "no such session on this device")
        # The executor, quoting a COMMAND that is not waiting.
        await device.send(
            type="command_results",
            status="continue",
            client_id="dev-1",
            session_id="c@task_1",
            prev_response_id=str(uuid.uuid4()),
            action_results=forged,
        )
        await expect_error(device, "no command is waiting for this answer")

        await assert_quiet(owner, device, other)
        (row,) = await sessions_in_sql(server)
        assert (row.session_id, row.state) == ("c@task_1", "running")
        assert server.app.state.sessions.get("c@task_2") is None

        await answer(device, command, "real")
        end = await owner.recv_type("task_end")
        assert (end["status"], end["result"][0]["result"]) == ("completed", "real")
        assert "forged" not in json.dumps(end)
        (row,) = await sessions_in_sql(server)
        assert (row.state, row.result[0]["result"]) == ("completed", "real")

        # Once answered, the same COMMAND cannot be answered again.
        assert (await device.recv_type("task_end"))["session_id"] == "c@task_1"
        await answer(device, command, "replayed")
        await expect_error(device, "no such session on this device")

    run(scenario())


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


# -- 6.8 task_name path traversal ------------------------------------------------------------


class TestTaskName:
    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("../escape", "_escape"),
            ("a/b\\c", "a_b_c"),
            ("..", None),
            ("galaxy/nightly/task_3", "galaxy_nightly_task_3"),
        ],
    )
    def test_websocket_task_name_is_sanitised_everywhere(
        self, server: ServerThread, given: str, expected: str | None
    ) -> None:
        """The COMMAND and the SQL row carry the sanitised name (`..` becomes a UUID)."""

        async def scenario() -> tuple[str, str | None]:
            device = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "n@dev-1", "dev-1")
            await send_task(owner, target_id="dev-1", session_id="n@task_3", task_name=given)
            command = await device.recv_type("command")
            (row,) = await sessions_in_sql(server)
            return command["task_name"], row.task_name

        sent, stored = run(scenario())
        assert sent == stored
        if expected is None:
            assert uuid.UUID(sent)
        else:
            assert sent == expected

    def test_relay_task_frame_carries_the_sanitised_name(self, server: ServerThread) -> None:
        """A relay device's TASK frame uses the sanitised name too."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1", relay=True)
            owner = await connect_constellation(server, "n@dev-1", "dev-1")
            await send_task(
                owner, target_id="dev-1", session_id="n@t", task_name="../../etc/passwd"
            )
            task = await device.recv_type("task")
            assert task["task_name"] == "_.._etc_passwd"
            (row,) = await sessions_in_sql(server)
            assert row.task_name == "_.._etc_passwd"

        run(scenario())

    def test_http_dispatch_refuses_an_unsafe_task_name(self, server: ServerThread) -> None:
        """POST /api/dispatch with task_name `../x` is 400 and starts nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
            ) as http:
                response = await http.post(
                    "/api/dispatch",
                    json={"client_id": "dev-1", "request": PLAN, "task_name": "../x"},
                )
            assert response.status_code == 400
            assert response.json()["detail"].startswith("Invalid task_name")
            await assert_quiet(device)
            assert await sessions_in_sql(server) == []

        run(scenario())


# -- 6.9 cross-device task-result injection --------------------------------------------------


def test_forged_task_end_is_never_relayed(server: ServerThread) -> None:
    """TASK_END from a device that is not the executor, or from a constellation, is refused and
    never reaches the owner; the executor's own TASK_END completes the session."""

    async def scenario() -> None:
        executor = await connect_device(server, "dev-1", relay=True)
        other = await connect_device(server, "dev-2")
        owner = await connect_constellation(server, "n@dev-1", "dev-1")
        await send_task(owner, target_id="dev-1", session_id="n@task_1")
        assert (await owner.recv())["session_id"] == "n@task_1"
        task = await executor.recv_type("task")
        assert task["session_id"] == "n@task_1"

        forged = {"status": "completed", "session_id": "n@task_1", "metadata": {"result": "forged"}}
        await other.send(type="task_end", client_id="dev-2", **forged)
        await expect_error(other, "task_end")
        await owner.send(
            type="task_end", client_type="constellation", client_id="n@dev-1", **forged
        )
        await expect_error(owner, "task_end")
        await assert_quiet(other, owner, executor)
        (row,) = await sessions_in_sql(server)
        assert row.state == "running"

        await executor.send(
            type="task_end",
            status="completed",
            client_id="dev-1",
            session_id="n@task_1",
            metadata={"result": "genuine"},
        )
        end = await owner.recv()
        assert (end["type"], end["status"], end["result"]) == ("task_end", "completed", "genuine")
        (row,) = await sessions_in_sql(server)
        assert (row.state, row.result) == ("completed", "genuine")
        await assert_quiet(other)

    run(scenario())


def test_executor_task_end_for_an_agent_session_is_refused(server: ServerThread) -> None:
    """In agent mode only the server ends a session: the device's own TASK_END is refused."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        owner = await connect_constellation(server, "n@dev-1", "dev-1")
        await send_task(owner, target_id="dev-1", session_id="n@task_1")
        await owner.recv()
        command = await device.recv_type("command")
        await device.send(
            type="task_end",
            status="completed",
            client_id="dev-1",
            session_id="n@task_1",
            metadata={"result": "forged"},
        )
        await expect_error(device, "task_end")
        await assert_quiet(owner)
        await answer(device, command, "real")
        end = await owner.recv_type("task_end")
        assert end["result"][0]["result"] == "real"

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


# -- 6.12 DNS rebinding and cross-origin calls -----------------------------------------------


class TestLocalOnly:
    @pytest.mark.parametrize(
        "headers",
        [
            {"Host": "evil.example"},
            {"Host": "evil.example:80"},
            {"Origin": "http://evil.example"},
            {"Origin": "http://localhost.evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
        ],
        ids=["host", "host-port", "origin", "origin-lookalike", "sec-fetch-site"],
    )
    def test_foreign_browser_requests_are_refused(
        self, server: ServerThread, headers: dict[str, str]
    ) -> None:
        """403 even with the right key, and a dispatch sent that way starts nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
            ) as http:
                response = await http.get("/api/clients", headers=headers)
                assert response.status_code == 403
                assert "dev-1" not in response.text
                assert "detail" in response.json()
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-1", "request": PLAN}, headers=headers
                )
                assert response.status_code == 403
            await assert_quiet(device)
            assert await sessions_in_sql(server) == []

        run(scenario())

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Host": "localhost:{port}"},
            {"Host": "127.0.0.1:{port}", "Origin": "http://localhost:3000"},
            {"Sec-Fetch-Site": "same-origin"},
        ],
        ids=["default", "localhost", "local-origin", "same-origin"],
    )
    def test_local_requests_are_served(self, server: ServerThread, headers: dict[str, str]) -> None:
        """Local Host and Origin values work."""
        filled = {k: v.format(port=server.port) for k, v in headers.items()}
        with server.http() as http:
            response = http.get("/api/health", headers=filled)
        assert response.status_code == 200
        assert response.json()["status"] == "healthy"

    def test_cross_origin_websocket_is_refused(self, server: ServerThread) -> None:
        """A WebSocket upgrade from a foreign Origin is refused (403) even with the token."""

        async def scenario() -> None:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(server.ws_url, origin="http://evil.example")
            assert info.value.response.status_code == 403
            assert server.registry.list_clients() == []

        run(scenario())


# -- 6.13 denial of service: frames and registration -----------------------------------------


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
