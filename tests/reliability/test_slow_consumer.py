"""Slow consumer: a client that stops reading is closed with reason `slow_consumer` (bounded
outbox, send timeout) and removed at once, without stalling anyone else. The other clients'
p99 is measured without and with slow consumers present."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import connections
from tests.reliability.support import (
    Closed,
    LoadGen,
    RawPool,
    ServeProcess,
    check_sessions,
    latency_figures,
    record,
    scale,
)

SEND_TIMEOUT = 1.0
PHASE = scale(3.0, 20.0)
SLOW = scale(3, 10)
BIG_INFO = {"blob": "x" * 60_000}  # each device-info answer is ~60 kB


async def _slow_consumer(port: int, i: int, removed_by: Callable[[str], bool]) -> dict[str, Any]:
    """A device with a large system info and a constellation that asks for it over and over
    but never reads an answer. Returns how long until the server dropped the constellation."""
    device_id, con_id = f"slow-dev-{i}", f"slow-con-{i}@slow-dev-{i}"
    async with RawPool(port) as pool:
        device = await pool.connect()
        await device.register(
            device_id,
            metadata={"system_info": {"device_id": device_id, "custom_metadata": BIG_INFO}},
        )
        con = await pool.connect(rcvbuf=4096)
        await con.register(con_id, client_type="constellation", target_id=device_id)
        con.stop_reading()
        started = time.monotonic()
        asked = 0
        deadline = started + 60  # without the fix it stays until the heartbeat timeout (45 s)
        while time.monotonic() < deadline and not removed_by(con_id):
            try:
                for _ in range(20):
                    await con.send_json(
                        type="device_info_request",
                        client_type="constellation",
                        client_id=con_id,
                        target_id=device_id,
                        request_id=f"r{asked}",
                    )
                    asked += 1
            except (ConnectionError, Closed):
                break
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - started
        await device.close()
        return {"client_id": con_id, "requests": asked, "removed_after_s": round(gone_after, 2)}


def test_slow_consumer_is_closed_and_others_are_not_stalled(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
) -> None:
    """Each non-reading client is dropped within the send timeout plus a margin, recorded as
    `slow_consumer`; the other clients see no error and no drop and keep their sessions going."""
    server = serve(
        env={"CCM_SERVER_SEND_TIMEOUT": f"{SEND_TIMEOUT}s", "CCM_SERVER_HEARTBEAT_INTERVAL": "30s"}
    )
    devices, constellations = scale(50, 200), scale(10, 40)
    load = loadgen(
        server.ws_url,
        "others",
        devices=devices,
        constellations=constellations,
        heartbeat=0.25,
        duration=600,
    )
    load.wait(
        lambda p: p["online"] >= devices + constellations and p["acks"] >= 50, 60, "load running"
    )
    without_from = time.time()
    time.sleep(PHASE)
    with_from = time.time()

    async def slow_ones() -> list[dict[str, Any]]:
        def removed(client_id: str) -> bool:
            return client_id not in server.online()

        return await asyncio.gather(*(_slow_consumer(server.port, i, removed) for i in range(SLOW)))

    slow = asyncio.run(slow_ones())
    with_until = time.time()
    time.sleep(max(0.0, PHASE - (with_until - with_from)))
    result = load.stop()
    assert server.terminate() == 0, server.log()

    for one in slow:
        # The send timeout, then at most the same again for the close frame, plus a generous
        # margin for a busy machine (this loop polls the API between its requests). Without
        # the fix the client stays until the heartbeat timeout, 1.5 x 30 s.
        assert one["removed_after_s"] < 2 * SEND_TIMEOUT + 20, one
    with db.connect() as conn:
        reasons = dict(
            conn.execute(
                select(connections.c.client_id, connections.c.disconnect_reason).where(
                    connections.c.client_id.like("slow-con-%")
                )
            ).all()
        )
    assert reasons == {one["client_id"]: "slow_consumer" for one in slow}
    assert result["error_frames"] == []
    assert result["drops"] == 0
    loss = check_sessions(db, result)
    assert (loss.missing, loss.completed_lost, loss.not_finished) == (0, 0, 0)
    assert server.problems() == []
    record(
        "slow_consumer",
        backend,
        slow_consumers=SLOW,
        others=devices + constellations,
        removed_after_s=[one["removed_after_s"] for one in slow],
        send_timeout_s=SEND_TIMEOUT,
        without=latency_figures(result, without_from, with_from),
        with_slow=latency_figures(result, with_from, with_from + PHASE),
    )
