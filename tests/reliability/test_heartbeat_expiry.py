"""Heartbeat expiry: a client process frozen with SIGSTOP keeps its socket open but sends
nothing. It is marked offline within 1.5x the heartbeat interval (plus a margin for the machine),
the reason `heartbeat_timeout` is persisted, its sessions end, and the other side is told."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine

from tests.reliability.support import (
    REPO,
    RawPool,
    RawWs,
    ServeProcess,
    read_connection_rows,
    record,
    session_rows,
)

T = TypeVar("T")

INTERVAL = 2.0
LIMIT = 1.5 * INTERVAL
MARGIN = 3.0  # a slow machine may wake late; never earlier than the limit
DEVICE_GONE = "Task was cancelled because target device disconnected"
CONSTELLATION_GONE = "Task was cancelled because the requesting constellation disconnected"


class Frozen:
    """A `tests.reliability.stoppable` client process; its printed events are collected."""

    def __init__(self, port: int, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.stoppable", str(port), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def wait_for(self, event: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e["event"] == event]
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no {event!r} from the client process: {self.events[-5:]}")

    def freeze(self) -> float:
        """SIGSTOP; returns the time of the last frame the process sent."""
        self.process.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # its last printed line is flushed before it stops
        return max(e["t"] for e in self.events if e["event"] in {"heartbeat", "registered"})

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def frozen() -> Iterator[Callable[..., Frozen]]:
    made: list[Frozen] = []

    def make(port: int, *args: str) -> Frozen:
        client = Frozen(port, *args)
        made.append(client)
        return client

    yield make
    for client in made:
        client.end()


async def _until_task_end(ws: RawWs, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        frame = await ws.recv_json(max(0.01, deadline - time.monotonic()))
        if frame["type"] == "task_end":
            frame["received_at"] = time.time()
            return frame


async def _heartbeating(ws: RawWs, client_id: str, work: Awaitable[T]) -> T:
    """Await `work` while `ws` heartbeats every 0.5 s, so it cannot expire meanwhile."""
    waiting = asyncio.ensure_future(work)
    while not waiting.done():
        await ws.send_json(type="heartbeat", client_id=client_id)
        await asyncio.wait([waiting], timeout=0.5)
    return waiting.result()


async def _until_type(ws: RawWs, kind: str, timeout: float) -> dict[str, Any]:
    """The next frame of type `kind` (heartbeat acks skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await ws.recv_json(max(0.01, deadline - time.monotonic()))
        if frame["type"] == kind:
            return frame


async def _alive_until_task_end(ws: RawWs, client_id: str, timeout: float) -> dict[str, Any]:
    """Wait for a TASK_END on a live client that heartbeats meanwhile: one that stays silent as
    long as the frozen peer would expire too, and may go first (its last frame can be the
    earlier one: the frozen client heartbeats every 0.5 s until it is stopped)."""
    waiting = asyncio.create_task(_until_task_end(ws, timeout))
    while not waiting.done():
        await ws.send_json(type="heartbeat", client_id=client_id)
        await asyncio.wait([waiting], timeout=0.5)
    return waiting.result()


def test_frozen_device_and_frozen_constellation_expire(
    serve: Callable[..., ServeProcess],
    frozen: Callable[..., Frozen],
    db: Engine,
    backend: str,
) -> None:
    """A frozen device: offline in time, `heartbeat_timeout`, its session failed and the
    constellation told. A frozen constellation: likewise, its session cancelled, device told."""
    server = serve(env={"CCM_SERVER_HEARTBEAT_INTERVAL": f"{INTERVAL}s"})

    async def scenario() -> dict[str, Any]:
        async with RawPool(server.port) as pool:
            # 1. A frozen device with a session in flight; its constellation is here.
            device = frozen(server.port, "device", "hb-dev-1")
            assert device.wait_for("registered")["status"] == "ok"
            con = await pool.connect()
            await con.register(
                "hb-con-1@hb-dev-1", client_type="constellation", target_id="hb-dev-1"
            )
            await con.send_json(
                type="task",
                status="continue",
                client_type="constellation",
                client_id="hb-con-1@hb-dev-1",
                target_id="hb-dev-1",
                session_id="hb-s1",
                request="x",
            )
            ack = await con.recv_json()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "hb-s1")
            device.wait_for("frame")  # the task reached the device
            device_last = await asyncio.to_thread(device.freeze)
            told_con = await _alive_until_task_end(con, "hb-con-1@hb-dev-1", LIMIT + MARGIN + 5)

            # 2. A live device here; a frozen constellation with a session on it. The device
            # heartbeats while the frozen client's process starts (slow on a loaded machine).
            dev2 = await pool.connect()
            await dev2.register("hb-dev-2", metadata={"ccm_execution": "relay"})
            con2 = await _heartbeating(
                dev2,
                "hb-dev-2",
                asyncio.to_thread(
                    frozen, server.port, "constellation", "hb-con-2@hb-dev-2", "hb-dev-2"
                ),
            )
            registered = await _heartbeating(
                dev2, "hb-dev-2", asyncio.to_thread(con2.wait_for, "registered")
            )
            assert registered["status"] == "ok"
            task = await _heartbeating(dev2, "hb-dev-2", _until_type(dev2, "task", LIMIT * 4))
            assert task["type"] == "task"
            con_last = await asyncio.to_thread(con2.freeze)

            told_dev = await _alive_until_task_end(dev2, "hb-dev-2", LIMIT + MARGIN + 5)
            return {
                "device_last": device_last,
                "told_con": told_con,
                "con_last": con_last,
                "told_dev": told_dev,
                "session2": task["session_id"],
            }

    seen = asyncio.run(scenario())
    server.wait_drained()
    assert server.terminate() == 0, server.log()

    rows = {r.client_id: r for r in read_connection_rows(db)}
    sessions = session_rows(db)
    figures = {}
    for client_id, last, told, session_id, state, error in [
        ("hb-dev-1", seen["device_last"], seen["told_con"], "hb-s1", "failed", DEVICE_GONE),
        (
            "hb-con-2@hb-dev-2",
            seen["con_last"],
            seen["told_dev"],
            seen["session2"],
            "cancelled",
            CONSTELLATION_GONE,
        ),
    ]:
        row = rows[client_id]
        assert row.disconnect_reason == "heartbeat_timeout", row
        silent_for = row.disconnected_at.timestamp() - last
        assert LIMIT - 0.3 <= silent_for <= LIMIT + MARGIN, (client_id, silent_for)
        assert (told["session_id"], told["status"], told["error"]) == (session_id, "failed", error)
        [session] = sessions[session_id]
        assert session["state"] == state, session
        figures[client_id.split("@")[0]] = {
            "offline_after_last_frame_s": round(silent_for, 2),
            "other_side_told_after_s": round(told["received_at"] - last, 2),
        }
    assert server.problems() == []
    record("heartbeat_expiry", backend, interval_s=INTERVAL, limit_s=LIMIT, **figures)
