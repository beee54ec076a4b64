"""Open files: `ccm serve` raises its soft RLIMIT_NOFILE to the hard limit at start, and when
descriptors run short anyway it logs a WARNING and `/api/health` says so (`degraded`,
`file_descriptors.short`), instead of failing registrations with no line in the log."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import websockets

from tests.reliability.support import ServeProcess, wait_until


def test_soft_open_files_limit_is_raised_to_the_hard_one(
    serve: Callable[..., ServeProcess],
) -> None:
    """Started with 256 soft / 4096 hard, the server runs with 4096 and reports it."""
    server = serve(open_files=(256, 4096))
    fds = server.health()["file_descriptors"]
    assert fds["limit"] == 4096
    assert fds["short"] is False


async def connect_until_short(server: ServeProcess, most: int) -> tuple[dict[str, Any], int]:
    """Register devices, looking at `/api/health` after every five, until it reports
    descriptors running short (or `most` are connected); its answer and the device count."""
    held: list[Any] = []
    health: dict[str, Any] = {}
    try:
        while len(held) < most:
            ws = await websockets.connect(server.ws_url, open_timeout=5)
            held.append(ws)
            await ws.send(
                json.dumps(
                    {
                        "type": "register",
                        "status": "ok",
                        "client_id": f"fd-{len(held)}",
                        "metadata": {},
                    }
                )
            )
            await asyncio.wait_for(ws.recv(), 5)
            if len(held) % 5 == 0:
                health = await asyncio.to_thread(server.health)
                if health["file_descriptors"]["short"]:
                    break
        return health, len(held)
    finally:
        for ws in held:
            with contextlib.suppress(Exception):
                await ws.close()


def test_running_short_of_descriptors_is_logged_and_reported(
    serve: Callable[..., ServeProcess],
) -> None:
    """With a limit of 160 that cannot be raised, clients connect until `/api/health` says
    descriptors are running short (degraded, `short: true`) well before the limit, with a
    WARNING in the log; once the clients are gone it is healthy again."""
    server = serve(open_files=(160, 160))
    health, connected = asyncio.run(connect_until_short(server, 155))
    assert health["file_descriptors"]["short"], (connected, health)
    assert health["status"] == "degraded"
    assert health["file_descriptors"]["limit"] == 160
    assert "file descriptors running short" in server.log()
    wait_until(
        lambda: not server.health()["file_descriptors"]["short"], 30, "descriptors to recover"
    )
    assert server.health()["status"] == "healthy"
