"""Agent mode on a real server: a JSON tool plan becomes one COMMAND per step, answered by
COMMAND_RESULTS, until TASK_END; a failing tool, a silent device and a natural-language request
without a runner each end the session failed, with the row to match."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ccm.server.runners import NO_RUNNER_ERROR
from tests.server.scenario import (
    CLICK,
    LIST_TOOLS,
    ODD_SESSION_ID,
    answer_command,
    assert_full_frame,
    assert_ok_frame,
    assert_quiet,
    constellation,
    device,
    one_session,
    plan,
    send_task,
    success,
)
from tests.server.support import ServerThread, run


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
            # A late answer finds nothing waiting, changes nothing, and is dropped quietly (an
            # ERROR frame would show in UFO's log as a server error).
            await answer_command(dev, command, [success("late")])
            await assert_quiet(dev)

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
