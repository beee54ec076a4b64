"""A device's queue lives on the device's node: a constellation on another node is told its
place, its session starts there in turn, and leaving cancels what still waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import sessions
from tests.cluster.test_cross_node import _constellation, _device
from tests.reliability.support import ServeProcess, wait_until
from tests.server.support import AipClient, run

DEVICE = "q-dev-1"
REQUESTER = "q-con-1@q-dev-1"


async def _task(constellation: AipClient, session_id: str) -> None:
    await constellation.send(
        type="task",
        client_type="constellation",
        client_id=REQUESTER,
        target_id=DEVICE,
        session_id=session_id,
        request="do it",
        status="continue",
    )


def _rows(db: Engine) -> dict[str, Any]:
    with db.connect() as conn:
        return {row.session_id: row for row in conn.execute(select(sessions))}


def test_a_queued_task_from_another_node_waits_on_the_devices_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """Capacity 1 on node A, constellation on B: the second TASK's ACK (over the bus) carries
    queue position 1, it is handed to the device when the first ends, and the constellation
    leaving cancels the third, which never ran."""
    a = node("a", env={"CCM_DISPATCH_DEFAULT_MAX_CONCURRENT_TASKS": "1"})
    b = node("b")

    async def scenario() -> list[int]:
        device = await _device(a.ws_url, DEVICE)
        constellation = await _constellation(b.ws_url, REQUESTER, DEVICE)
        positions = []
        for session_id in ("q-s1", "q-s2", "q-s3"):
            await _task(constellation, session_id)
            ack = await constellation.recv_type("heartbeat", timeout=10)
            assert ack["session_id"] == session_id
            positions.append((ack.get("metadata") or {}).get("queue_position", 0))
        assert (await device.recv_type("task", timeout=10))["session_id"] == "q-s1"
        await device.send(type="task_end", client_id=DEVICE, session_id="q-s1", status="completed")
        assert (await constellation.recv_type("task_end", timeout=10))["session_id"] == "q-s1"
        assert (await device.recv_type("task", timeout=10))["session_id"] == "q-s2"
        await constellation.close()
        await asyncio.to_thread(  # before the device leaves, which would fail them instead
            wait_until,
            lambda: _rows(db)["q-s3"].state != "pending",
            what="the waiting session ended on the device's node",
        )
        return positions

    assert run(scenario()) == [0, 1, 2]
    rows = _rows(db)
    assert (rows["q-s2"].state, rows["q-s3"].state) == ("cancelled", "cancelled")
    assert rows["q-s3"].started_at is None
    assert rows["q-s3"].server_run_id == rows["q-s1"].server_run_id  # all on A
