"""task_name path traversal, on a real server: the name is sanitised in the COMMAND, in a relay
TASK and in the SQL row, and HTTP dispatch refuses an unsafe one."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.server.scenario import (
    PLAN,
    assert_quiet,
    connect_constellation,
    connect_device,
    send_task,
    sessions_in_sql,
)
from tests.server.support import API_KEY, ServerThread, run


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
