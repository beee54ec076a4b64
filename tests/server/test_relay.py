"""Relay mode on a real server: the device runs the task itself and reports its end; the frames
both sides see and the session row it leaves behind, on SQLite and Postgres."""

from __future__ import annotations

from typing import Any

from tests.server.scenario import (
    ODD_SESSION_ID,
    assert_full_frame,
    assert_ok_frame,
    constellation,
    device,
    one_session,
    send_task,
)
from tests.server.support import ServerThread, run


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
