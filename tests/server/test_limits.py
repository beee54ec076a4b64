"""Per-client limits that keep one peer from growing server state without bound (6.13)."""

from __future__ import annotations

from collections.abc import Callable

from tests.server.support import AipClient, ServerThread, run, track


def test_sessions_beyond_the_per_client_limit_are_refused(
    server_factory: Callable[..., ServerThread],
) -> None:
    """With a limit of 2, a third running session of one constellation gets ERROR + task_end."""
    server = server_factory(**{"server.max_live_sessions_per_client": 2})

    async def scenario() -> None:
        device = track(await AipClient.connect(server.ws_url))
        await device.register_device("lim-dev", relay=True)
        constellation = track(await AipClient.connect(server.ws_url))
        await constellation.register_constellation("lim@lim-dev", "lim-dev")
        replies = []
        for n in range(3):
            await constellation.send(
                type="task",
                status="continue",
                client_type="constellation",
                client_id="lim@lim-dev",
                target_id="lim-dev",
                session_id=f"lim@{n}",
                request="hold",
            )
            replies.append(await constellation.recv())
        ack0, ack1, error = replies
        assert [ack0["session_id"], ack1["session_id"]] == ["lim@0", "lim@1"]
        assert error["type"] == "error"
        assert "too many running sessions" in error["error"]
        task_end = await constellation.recv()
        assert (task_end["type"], task_end["status"], task_end["session_id"]) == (
            "task_end",
            "failed",
            "lim@2",
        )

    run(scenario())
