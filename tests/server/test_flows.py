"""End-to-end AIP flows against a real server on SQLite and Postgres: every test checks the frames
the clients see and the SQL rows (clients, connections, sessions) the flow must leave behind."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ccm.server.orchestrator import CONSTELLATION_GONE_ERROR, DEVICE_GONE_ERROR
from ccm.server.runners import NO_RUNNER_ERROR
from tests.server.scenario import (
    CLICK,
    LIST_TOOLS,
    ODD_SESSION_ID,
    SYSTEM_INFO,
    answer_command,
    assert_full_frame,
    assert_ok_frame,
    client_row,
    closed_connection,
    closed_with,
    connection_rows,
    constellation,
    device,
    one_session,
    plan,
    send_task,
    session_rows,
    success,
)
from tests.server.support import ServerThread, open_client, run
from tests.support import wait_until

# -- registration, heartbeat, device info -------------------------------------------------------


class TestRegistration:
    def test_device_registration_is_confirmed_and_recorded(self, server: ServerThread) -> None:
        """A device's first frame back is a full heartbeat/ok; SQL has it online, then closed."""

        async def scenario() -> None:
            client = await open_client(server)
            reply = await client.register_device("lab-pc-07", platform="windows", **SYSTEM_INFO)
            assert_ok_frame(reply)
            online = client_row(server, "lab-pc-07")
            rows = connection_rows(server, "lab-pc-07")
            assert online["client_type"] == "device"
            assert online["platform"] == "windows"
            assert online["online"] is True
            assert online["system_info"] == {
                "device_id": "lab-pc-07",
                "platform": "windows",
                **SYSTEM_INFO,
            }
            assert online["metadata"]["platform"] == "windows"
            assert len(rows) == 1
            assert online["current_connection_id"] == rows[0].connection_id
            assert rows[0].client_type == "device"
            assert rows[0].disconnected_at is None
            assert rows[0].remote_address
            assert rows[0].remote_address.startswith("127.0.0.1:")
            assert rows[0].server_run_id == server.app.state.store.run_id

        run(scenario())
        closed = closed_connection(server, "lab-pc-07")
        assert closed.disconnect_reason == "closed"
        after = client_row(server, "lab-pc-07")
        assert (after["online"], after["current_connection_id"]) == (False, None)

    def test_constellation_registration_is_confirmed_and_recorded(
        self, server: ServerThread
    ) -> None:
        """A constellation naming a live device is confirmed with a full heartbeat/ok."""

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            client = await open_client(server)
            assert_ok_frame(await client.register_constellation("nightly@lab-pc-07", "lab-pc-07"))

        run(scenario())
        row = client_row(server, "nightly@lab-pc-07")
        assert row["client_type"] == "constellation"
        assert row["metadata"] == {"type": "constellation_client"}
        assert row["system_info"] is None
        closed = closed_connection(server, "nightly@lab-pc-07")
        assert (closed.client_type, closed.disconnect_reason) == ("constellation", "closed")

    def test_constellation_for_absent_device_is_refused(self, server: ServerThread) -> None:
        """A constellation naming a device that is not live gets ERROR, then close 1008, no row."""

        async def scenario() -> None:
            client = await open_client(server)
            reply = await client.register_constellation("nightly@ghost", "ghost")
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("error", "error")
            assert reply["error"] == "Target device 'ghost' is not connected"
            code, _reason = await closed_with(client)
            assert code == 1008

        run(scenario())
        assert connection_rows(server, "nightly@ghost") == []

    def test_heartbeat_is_acked(self, server: ServerThread) -> None:
        """A device HEARTBEAT gets heartbeat/ok without a session id."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07")
            await dev.send(type="heartbeat", client_id="lab-pc-07")
            assert_ok_frame(await dev.recv())

        run(scenario())
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "closed"

    def test_constellation_heartbeat_claiming_device_role_is_acked(
        self, server: ServerThread
    ) -> None:
        """Decision D2: Galaxy's heartbeat says client_type "device"; it is acked, not refused."""

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await con.send(
                type="heartbeat",
                client_type="device",
                client_id="nightly@lab-pc-07",
                metadata={"device_id": "lab-pc-07"},
            )
            assert_ok_frame(await con.recv())

        run(scenario())
        assert closed_connection(server, "nightly@lab-pc-07").disconnect_reason == "closed"

    def test_device_info_request_returns_system_info(self, server: ServerThread) -> None:
        """device_info_response echoes request_id as response_id and carries the system info."""
        request_id = "device_info_lab-pc-07_1777627862.125914"

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await con.send(
                type="device_info_request",
                client_type="constellation",
                client_id="nightly@lab-pc-07",
                target_id="lab-pc-07",
                request_id=request_id,
            )
            reply = await con.recv()
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("device_info_response", "ok")
            assert reply["response_id"] == request_id
            assert reply["result"] == {
                "device_id": "lab-pc-07",
                "platform": "windows",
                **SYSTEM_INFO,
            }
            assert reply["error"] is None

        run(scenario())

    def test_device_info_for_unknown_device_is_an_error_response(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """An unknown device gets status "error" and result {"error": ...}, response_id echoed."""
        server = server_factory(**{"server.allow_unscoped_constellations": True})

        async def scenario() -> None:
            con = await constellation(server, "nightly", None)
            await con.send(
                type="device_info_request",
                client_type="constellation",
                client_id="nightly",
                target_id="ghost",
                request_id="req-ghost",
            )
            reply = await con.recv()
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("device_info_response", "error")
            assert reply["response_id"] == "req-ghost"
            assert set(reply["result"]) == {"error"}
            assert "ghost" in reply["result"]["error"]

        run(scenario())
        assert closed_connection(server, "nightly").disconnect_reason == "closed"


# -- relay mode ---------------------------------------------------------------------------------


def test_relay_task_round_trip(server: ServerThread) -> None:
    """TASK -> ACK -> task to the device -> device task_end -> task_end to both, same session id."""
    result = {"summary": "exported", "path": "C:\\Reports\\Q3.pdf", "ünïcode": True}

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Export Q3.", "galaxy/nightly/task_3")
        assert_ok_frame(await con.recv(), ODD_SESSION_ID)
        assignment = await dev.recv()
        assert_full_frame(assignment)
        assert (assignment["type"], assignment["status"]) == ("task", "continue")
        assert assignment["session_id"] == ODD_SESSION_ID
        assert assignment["user_request"] == "Export Q3."
        assert assignment["task_name"] == "galaxy_nightly_task_3"
        assert server.registry.session_count() == 1
        await dev.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-07",
            session_id=assignment["session_id"],
            metadata={"result": result},
        )
        end = await con.recv()
        assert_full_frame(end)
        assert (end["type"], end["status"]) == ("task_end", "completed")
        assert end["session_id"] == ODD_SESSION_ID
        assert end["result"] == result
        assert end["error"] is None
        assert await dev.recv() == end

    run(scenario())
    assert server.registry.session_count() == 0
    row = one_session(server, ODD_SESSION_ID)
    assert (row.state, row.reason, row.mode, row.origin) == (
        "completed",
        None,
        "relay",
        "constellation",
    )
    assert row.result == result
    assert (row.constellation_id, row.device_id) == ("nightly@lab-pc-07", "lab-pc-07")
    assert (row.task_name, row.request) == ("galaxy_nightly_task_3", "Export Q3.")
    assert row.ended_at is not None
    assert row.started_at is not None


def test_relay_task_end_from_another_device_is_refused(server: ServerThread) -> None:
    """Only the session's executor may report its end; anyone else gets an ERROR, no effect."""

    async def scenario() -> dict[str, Any]:
        dev = await device(server, "lab-pc-07", relay=True)
        other = await device(server, "lab-pc-08", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await send_task(con, "lab-pc-07", "nightly@task_1", "Do it.")
        await con.recv()  # ACK
        await dev.recv()  # the task
        await other.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-08",
            session_id="nightly@task_1",
            metadata={"result": "forged"},
        )
        assert (await other.recv())["type"] == "error"
        await dev.send(
            type="task_end",
            status="failed",
            client_id="lab-pc-07",
            session_id="nightly@task_1",
            error="could not",
            action_results=[{"status": "failure", "error": "could not"}],
        )
        end = await con.recv()
        assert (end["type"], end["status"], end["error"]) == ("task_end", "failed", "could not")
        assert end["result"] == [
            {
                "status": "failure",
                "error": "could not",
                "result": None,
                "namespace": None,
                "call_id": None,
            }
        ]
        return end

    end = run(scenario())
    row = one_session(server, "nightly@task_1")
    assert (row.state, row.reason, row.error) == ("failed", "task_failed", "could not")
    assert row.result == end["result"]


# -- agent mode: JSON tool plans -----------------------------------------------------------------


class TestToolPlan:
    def test_tool_plan_round_trip_completes_with_results(self, server: ServerThread) -> None:
        """Each plan step is one COMMAND (agent by platform, call_ids), answered by response id."""

        async def scenario() -> dict[str, Any]:
            dev = await device(server, "linux-01", platform="linux")
            con = await constellation(server, "nightly@linux-01", "linux-01")
            await send_task(con, "linux-01", ODD_SESSION_ID, plan(LIST_TOOLS, CLICK), "a/b\\c")
            assert_ok_frame(await con.recv(), ODD_SESSION_ID)
            first = await dev.recv()
            await answer_command(dev, first, [success([{"tool_name": "click_input"}])])
            second = await dev.recv()
            await answer_command(dev, second, [success("Clicked.", "AppUIExecutor")])
            call_ids = []
            for command, call in zip([first, second], [LIST_TOOLS, CLICK], strict=True):
                assert_full_frame(command)
                assert (command["type"], command["status"]) == ("command", "continue")
                assert command["agent_name"] == "LinuxAgent"
                assert (command["process_name"], command["root_name"]) == (None, None)
                assert command["session_id"] == ODD_SESSION_ID
                assert command["task_name"] == "a_b_c"
                [action] = command["actions"]
                assert {k: action[k] for k in ("tool_name", "parameters", "tool_type")} == call
                assert action["call_id"]
                call_ids.append(action["call_id"])
            assert len(set(call_ids)) == 2
            assert first["response_id"] != second["response_id"]

            end = await con.recv()
            assert (end["type"], end["status"], end["error"]) == ("task_end", "completed", None)
            assert end["session_id"] == ODD_SESSION_ID
            assert end["result"] == [
                {
                    "tool_name": "list_tools",
                    **success([{"tool_name": "click_input"}]),
                    "call_id": call_ids[0],
                },
                {
                    "tool_name": "click_input",
                    **success("Clicked.", "AppUIExecutor"),
                    "call_id": call_ids[1],
                },
            ]
            assert await dev.recv() == end
            return end

        end = run(scenario())
        assert server.registry.session_count() == 0
        row = one_session(server, ODD_SESSION_ID)
        assert (row.state, row.reason, row.mode) == ("completed", None, "agent")
        assert row.result == end["result"]

    def test_tool_plan_object_form_sets_agent_and_batches_a_round(
        self, server: ServerThread
    ) -> None:
        """{"agent_name", "root_name", "tools": [[a, b]]}: one COMMAND with both calls."""
        request = json.dumps(
            {"agent_name": "AppAgent", "root_name": "WINWORD.EXE", "tools": [[LIST_TOOLS, CLICK]]}
        )

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_9", request)
            await con.recv()  # ACK
            command = await dev.recv()
            assert (command["agent_name"], command["root_name"]) == ("AppAgent", "WINWORD.EXE")
            assert [a["tool_name"] for a in command["actions"]] == ["list_tools", "click_input"]
            await answer_command(dev, command, [success("tools"), success("Clicked.")])
            end = await con.recv()
            assert end["status"] == "completed"
            assert [r["tool_name"] for r in end["result"]] == ["list_tools", "click_input"]

        run(scenario())
        assert one_session(server, "nightly@task_9").state == "completed"

    def test_default_agent_for_windows_is_host_agent(self, server: ServerThread) -> None:
        """Without agent_name, a Windows device is driven as HostAgent."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07", platform="windows")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_2", plan(CLICK))
            await con.recv()  # ACK
            command = await dev.recv()
            assert command["agent_name"] == "HostAgent"
            await answer_command(dev, command, [success("Clicked.")])
            await con.recv_type("task_end")

        run(scenario())
        assert one_session(server, "nightly@task_2").state == "completed"

    def test_failing_tool_fails_the_session(self, server: ServerThread) -> None:
        """A `failure` result stops the plan: task_end failed with the tool's error."""

        async def scenario() -> dict[str, Any]:
            dev = await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_4", plan(CLICK, LIST_TOOLS))
            await con.recv()  # ACK
            command = await dev.recv()
            failure = {
                "status": "failure",
                "error": "no such control",
                "result": None,
                "namespace": None,
            }
            await answer_command(dev, command, [failure])
            end = await con.recv()
            assert (end["type"], end["status"]) == ("task_end", "failed")
            assert end["session_id"] == "nightly@task_4"
            assert end["error"] == "tool call failed: no such control"
            assert end["result"] == [
                {
                    "tool_name": "click_input",
                    "status": "failure",
                    "error": "no such control",
                    "result": None,
                    "namespace": None,
                    "call_id": command["actions"][0]["call_id"],
                }
            ]
            # The second step never ran: no further COMMAND came before the copy of the end.
            assert await dev.recv() == end
            return end

        end = run(scenario())
        row = one_session(server, "nightly@task_4")
        assert (row.state, row.reason, row.error) == ("failed", "task_failed", end["error"])
        assert row.result == end["result"]

    def test_unanswered_command_fails_after_command_timeout(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """A device that never answers a COMMAND fails the session after server.command_timeout."""
        server = server_factory(**{"server.command_timeout": "1s"})
        error = "device did not answer the command within 1 s"

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await send_task(con, "lab-pc-07", "nightly@task_5", plan(CLICK))
            await con.recv()  # ACK
            command = await dev.recv()
            end = await con.recv(timeout=10)
            assert (end["type"], end["status"]) == ("task_end", "failed")
            assert end["error"] == error
            assert end["result"] == []
            assert await dev.recv() == end
            # A late answer finds nothing waiting and changes nothing.
            await answer_command(dev, command, [success("late")])
            assert (await dev.recv())["type"] == "error"

        run(scenario())
        row = one_session(server, "nightly@task_5")
        assert (row.state, row.reason, row.error) == ("failed", "task_failed", error)


def test_natural_language_task_without_runner_fails_at_once(server: ServerThread) -> None:
    """Decision D3: no runner for natural language -> ACK, then task_end failed saying so."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07")
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Open the Q3 report in Excel.")
        assert_ok_frame(await con.recv(), ODD_SESSION_ID)
        end = await con.recv()
        assert_full_frame(end)
        assert (end["type"], end["status"], end["session_id"]) == (
            "task_end",
            "failed",
            ODD_SESSION_ID,
        )
        assert end["error"] == NO_RUNNER_ERROR
        assert "no runner is configured" in end["error"]
        assert end["result"] is None
        assert await dev.recv() == end  # the device got no COMMAND, only the copy of the end

    run(scenario())
    assert server.registry.session_count() == 0
    row = one_session(server, ODD_SESSION_ID)
    assert (row.state, row.reason, row.mode) == ("failed", "no_runner", "agent")
    assert row.request == "Open the Q3 report in Excel."


# -- device-initiated tasks (the "bounce") --------------------------------------------------------


class TestDeviceTask:
    def test_device_task_runs_through_the_runner_with_a_new_session_id(
        self, server: ServerThread
    ) -> None:
        """A device TASK with session_id null gets an ACK with a fresh id, COMMANDs, a task_end."""

        async def scenario() -> str:
            dev = await device(server, "lab-pc-07")
            await dev.send(
                type="task",
                status="continue",
                client_id="lab-pc-07",
                session_id=None,
                task_name="weekly-cleanup",
                request=plan(CLICK),
                request_id=str(uuid.uuid4()),
                metadata={"platform": "windows"},
            )
            ack = await dev.recv()
            assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
            session_id: str = ack["session_id"]
            assert uuid.UUID(session_id)
            command = await dev.recv()
            assert (command["type"], command["session_id"]) == ("command", session_id)
            assert command["task_name"] == "weekly-cleanup"
            await answer_command(dev, command, [success("Clicked.")])
            end = await dev.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "completed",
                session_id,
            )
            return session_id

        session_id = run(scenario())
        row = one_session(server, session_id)
        assert (row.state, row.origin, row.mode) == ("completed", "device", "agent")
        assert (row.constellation_id, row.device_id) == (None, "lab-pc-07")

    def test_bounced_task_from_relay_device_is_never_reassigned(self, server: ServerThread) -> None:
        """A relay device bouncing a task gets ACK and task_end failed (no runner), never a task."""

        async def scenario() -> str:
            dev = await device(server, "lab-pc-07", relay=True)
            await dev.send(
                type="task",
                status="continue",
                client_id="lab-pc-07",
                session_id=None,
                task_name="weekly-cleanup",
                request="Empty the recycle bin.",
                metadata={"platform": "windows"},
            )
            ack = await dev.recv()
            session_id: str = ack["session_id"]
            assert_ok_frame(ack, session_id)
            assert uuid.UUID(session_id)
            end = await dev.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "failed",
                session_id,
            )
            assert end["error"] == NO_RUNNER_ERROR
            # A heartbeat round trip proves nothing else (a task assignment) was queued meanwhile.
            await dev.send(type="heartbeat", client_id="lab-pc-07")
            assert_ok_frame(await dev.recv())
            return session_id

        session_id = run(scenario())
        row = one_session(server, session_id)
        assert (row.state, row.reason, row.origin, row.mode) == (
            "failed",
            "no_runner",
            "device",
            "agent",
        )


# -- refusals -------------------------------------------------------------------------------------


def test_task_with_running_session_id_is_refused(server: ServerThread) -> None:
    """A second TASK naming a running session gets ERROR + task_end failed; the first runs on."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "First.")
        assert_ok_frame(await con.recv(), ODD_SESSION_ID)
        await dev.recv()  # the task
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Second.")
        error = await con.recv()
        assert_full_frame(error)
        assert (error["type"], error["status"], error["session_id"]) == ("error", "error", None)
        assert "already running" in error["error"]
        refused = await con.recv()
        assert (refused["type"], refused["status"]) == ("task_end", "failed")
        assert (refused["session_id"], refused["error"], refused["result"]) == (
            ODD_SESSION_ID,
            error["error"],
            None,
        )
        await dev.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-07",
            session_id=ODD_SESSION_ID,
            metadata={"result": "first done"},
        )
        end = await con.recv()
        assert (end["status"], end["session_id"], end["result"]) == (
            "completed",
            ODD_SESSION_ID,
            "first done",
        )

    run(scenario())
    row = one_session(server, ODD_SESSION_ID)  # the refused TASK left no row
    assert (row.state, row.request, row.result) == ("completed", "First.", "first done")


def test_task_with_session_id_of_another_owner_is_refused(server: ServerThread) -> None:
    """Another constellation naming a live session is refused; only it is told, the owner's runs."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        owner = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        intruder = await constellation(server, "other@lab-pc-07", "lab-pc-07")
        await send_task(owner, "lab-pc-07", "nightly@task_3", "Mine.")
        await owner.recv()  # ACK
        await dev.recv()  # the task
        await send_task(intruder, "lab-pc-07", "nightly@task_3", "Steal.")
        error, refused_end = await intruder.recv(), await intruder.recv()
        assert error["type"] == "error"
        assert error["error"] == "session_id 'nightly@task_3' is owned by another client"
        assert (refused_end["type"], refused_end["status"], refused_end["result"]) == (
            "task_end",
            "failed",
            None,
        )
        await dev.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-07",
            session_id="nightly@task_3",
            metadata={"result": "secret"},
        )
        assert (await owner.recv())["result"] == "secret"
        # The intruder gets nothing more: its next frame is the ack of its own heartbeat.
        await intruder.send(type="heartbeat", client_id="other@lab-pc-07")
        assert_ok_frame(await intruder.recv())

    run(scenario())
    [row] = session_rows(server, "nightly@task_3")
    assert (row.constellation_id, row.state) == ("nightly@lab-pc-07", "completed")


@pytest.mark.parametrize(
    ("target_id", "error"),
    [
        ("lab-pc-08", "Not authorized to send tasks to device 'lab-pc-08'"),
        ("lab-pc-07", "Target device 'lab-pc-07' is not connected"),
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


def test_finished_session_id_may_run_again_as_a_new_row(server: ServerThread) -> None:
    """Once a session has ended its id may be sent again: a second run, a second row."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        ends = []
        for outcome in ("first", "second"):
            await send_task(con, "lab-pc-07", ODD_SESSION_ID, outcome)
            assert_ok_frame(await con.recv(), ODD_SESSION_ID)
            assert (await dev.recv())["user_request"] == outcome
            await dev.send(
                type="task_end",
                status="completed",
                client_id="lab-pc-07",
                session_id=ODD_SESSION_ID,
                metadata={"result": outcome},
            )
            ends.append(await con.recv())
            await dev.recv()  # the copy
        assert [e["result"] for e in ends] == ["first", "second"]

    run(scenario())
    rows = session_rows(server, ODD_SESSION_ID)
    assert sorted((r.request, r.state, r.result) for r in rows) == [
        ("first", "completed", "first"),
        ("second", "completed", "second"),
    ]
    assert rows[0].id != rows[1].id


# -- disconnects ----------------------------------------------------------------------------------


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
