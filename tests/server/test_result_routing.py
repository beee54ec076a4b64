"""Replies and results go only where they belong, on a real server: each reply to the connection
that asked; COMMAND_RESULTS and TASK_END only from the session's executor. Forged ones are
refused and change nothing: the session still waits for, and uses, the real answer."""

from __future__ import annotations

import json
import uuid

from tests.server.scenario import (
    answer,
    assert_quiet,
    connect_constellation,
    connect_device,
    expect_error,
    send_task,
    sessions_in_sql,
)
from tests.server.support import ServerThread, open_client, run

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

        # Once answered, the same COMMAND cannot be answered again: the session has ended, so
        # the replay is a late answer of its own device, dropped quietly with no effect.
        assert (await device.recv_type("task_end"))["session_id"] == "c@task_1"
        await answer(device, command, "replayed")
        await assert_quiet(device)
        (row,) = await sessions_in_sql(server)
        assert row.result[0]["result"] == "real"

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
