"""Tasks a device starts itself (the "bounce"), on a real server: a fresh session id, run
through the runner, and never handed back to a relay device as a task."""

from __future__ import annotations

import uuid

from ccm.server.runners import NO_RUNNER_ERROR
from tests.server.scenario import (
    CLICK,
    answer_command,
    assert_ok_frame,
    device,
    one_session,
    plan,
    success,
)
from tests.server.support import ServerThread, run


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
