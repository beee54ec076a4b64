"""Database away under load: Postgres unreachable (a TCP proxy in front of it is killed, or
frozen so its port is a black hole) and a SQLite file locked by another process (`BEGIN
EXCLUSIVE` held).

While the database is away the live path keeps serving (registrations, heartbeats, lookups,
device info, task_end of sessions already running); writes wait in the writer's queue, whose
depth `/api/health` shows together with `degraded`; new sessions are refused rather than
acknowledged without being durable. When the database returns, the queue is applied (idempotent
statements) and nothing a client was told is missing. At `writer.max_queue`, new sessions are
refused at once with a clear error while registrations keep working.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, make_url

from tests.reliability.support import (
    FULL,
    LoadGen,
    Proxy,
    RawPool,
    RawWs,
    ServeProcess,
    check_sessions,
    connection_counts,
    latency_figures,
    ms,
    record,
    scale,
    wait_until,
)

OUTAGE = scale(5.0, 30.0)
SERVER_ENV = {
    # A session waits this long (at least 1 s) for its durable point before it is refused.
    "CCM_SERVER_SEND_TIMEOUT": "2s",
    "CCM_WRITER_RETRY_INTERVAL": "0.5s",
    "CCM_SERVER_HEARTBEAT_INTERVAL": "30s",
}
# ERROR lines the server is expected to log while its database is away.
OUTAGE_LOG = (r"store did not confirm writes",)


class Fault:
    """Takes the database away from one ccm process and brings it back."""

    name: str
    url: str

    def begin(self) -> None: ...

    def end(self) -> None: ...

    def close(self) -> None: ...


class PostgresProxyFault(Fault):
    """ccm reaches Postgres through a proxy; kill it (database stopped: connections reset and
    refused) or freeze it (port blocked: connections hang), then bring it back."""

    def __init__(self, database_url: str, *, freeze: bool) -> None:
        self.proxy = Proxy(make_url(database_url).port or 5432).start()
        self.url = self.proxy.url_for(database_url)
        self.freeze = freeze
        self.name = "postgres port blocked" if freeze else "postgres stopped"

    def begin(self) -> None:
        if self.freeze:
            self.proxy.pause()
        else:
            self.proxy.kill()

    def end(self) -> None:
        if self.freeze:
            self.proxy.resume()
        else:
            self.proxy.start()

    def close(self) -> None:
        if self.proxy.process is not None and self.proxy.process.poll() is None:
            self.proxy.resume()
        self.proxy.kill()


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


class SqliteLockFault(Fault):
    """Another process holds `BEGIN EXCLUSIVE` on the database file until it is ended."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.path = str(make_url(database_url).database)
        self.name = "sqlite file locked"
        self.locker: subprocess.Popen[bytes] | None = None

    def begin(self) -> None:
        self.locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.locker.stdout is not None
        assert self.locker.stdout.readline().strip() == b"locked"

    def end(self) -> None:
        self.close()

    def close(self) -> None:
        if self.locker is not None:
            if self.locker.poll() is None:
                self.locker.kill()
                self.locker.wait(10)
            for pipe in (self.locker.stdin, self.locker.stdout):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def make_fault(database_url: str, backend: str) -> Iterator[Callable[..., Fault]]:
    made: list[Fault] = []

    def make(*, freeze: bool = False) -> Fault:
        fault: Fault = (
            PostgresProxyFault(database_url, freeze=freeze)
            if backend == "postgresql"
            else SqliteLockFault(database_url)
        )
        made.append(fault)
        return fault

    yield make
    for fault in made:
        fault.close()


async def _probe_live_path(server: ServeProcess, name: str) -> dict[str, Any]:
    """What a client can still do while the database is away: register, heartbeat, look up,
    ask for device info. Returns how long each step took."""
    async with RawPool(server.port) as pool:
        return await _probe(server, pool, name)


async def _probe(server: ServeProcess, pool: RawPool, name: str) -> dict[str, Any]:
    started = time.monotonic()
    device = await pool.connect()
    reply = await device.register(
        f"{name}-dev",
        metadata={
            "platform": "linux",
            "system_info": {"device_id": f"{name}-dev", "platform": "linux"},
        },
    )
    assert reply["status"] == "ok", reply
    registered = time.monotonic() - started
    await device.send_json(type="heartbeat", client_id=f"{name}-dev")
    beat = await device.recv_json()
    assert (beat["type"], beat["status"]) == ("heartbeat", "ok"), beat
    con = await pool.connect()
    reply = await con.register(
        f"{name}-con@{name}-dev", client_type="constellation", target_id=f"{name}-dev"
    )
    assert reply["status"] == "ok", reply
    await con.send_json(
        type="device_info_request",
        client_type="constellation",
        client_id=f"{name}-con@{name}-dev",
        target_id=f"{name}-dev",
        request_id="info-1",
    )
    info = await con.recv_json()
    assert (info["type"], info["response_id"]) == ("device_info_response", "info-1"), info
    assert info["result"]["device_id"] == f"{name}-dev"
    assert f"{name}-dev" in server.online()
    assert server.get(f"/api/devices/{name}-dev")["device_id"] == f"{name}-dev"
    await con.close()
    await device.close()
    return {"register_ms": ms(registered), "probe_ms": ms(time.monotonic() - started)}


@pytest.mark.parametrize("freeze", [False, True], ids=["down", "blocked"])
def test_database_away_under_load(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    make_fault: Callable[..., Fault],
    db: Engine,
    backend: str,
    freeze: bool,
) -> None:
    """The live path serves through an outage, health says degraded with the queue depth, and
    on return every write is applied and nothing a client was told is lost."""
    if freeze and backend == "sqlite":
        pytest.skip("a frozen port applies to a networked database only")
    if freeze and not FULL:
        pytest.skip("full version only (CCM_RELIABILITY_FULL=1)")
    fault = make_fault(freeze=freeze)
    server = serve(env=SERVER_ENV, url=fault.url)
    devices, constellations = scale(30, 100), scale(6, 20)
    load = loadgen(
        server.ws_url,
        "away",
        devices=devices,
        constellations=constellations,
        in_flight=2,
        duration=600,
    )
    load.wait(
        lambda p: p["online"] >= devices + constellations and p["acks"] >= 50, 60, "load running"
    )

    fault.begin()
    began = time.time()
    health = wait_until(
        lambda: (h := server.health())["status"] == "degraded" and h,
        OUTAGE,
        "/api/health to say degraded",
        interval=0.1,
    )
    degraded_after = time.time() - began
    probe = asyncio.run(_probe_live_path(server, "probe"))
    max_depth = 0
    while time.time() < began + OUTAGE:
        health = server.health()
        assert health["status"] == "degraded", health
        max_depth = max(max_depth, health["database"]["queue_depth"])
        time.sleep(0.2)
    during = load.progress()
    fault.end()
    ended = time.time()
    drained = server.wait_drained(60)
    recovered_in = time.time() - ended
    load.wait(lambda p: p["acks"] >= during["acks"] + 50, 60, "50 new sessions after the outage")

    result = load.stop()
    assert server.terminate() == 0, server.log()
    assert drained["status"] == "healthy"
    assert max_depth > 0
    loss = check_sessions(db, result)
    assert (loss.missing, loss.completed_lost, loss.not_finished, loss.duplicates) == (
        0,
        0,
        0,
        0,
    ), loss
    # Every registration a client was confirmed has its connection row: none lost in the queue.
    counts = connection_counts(db)
    for client_id, n in result["registrations_by_client"].items():
        assert counts.get(client_id) == n, (client_id, n, counts.get(client_id))
    assert counts.get("probe-dev") == 1
    assert server.problems(*OUTAGE_LOG) == []
    refused = [
        s
        for s in result["sessions"].values()
        if began <= s["sent"] < ended and s["status"] == "failed" and s["acked"] is None
    ]
    record(
        "database_away",
        backend,
        fault=fault.name,
        outage_s=OUTAGE,
        degraded_after_s=round(degraded_after, 2),
        max_queue_depth=max_depth,
        recovered_in_s=round(recovered_in, 2),
        live_probe=probe,
        acks_during_outage=sum(
            1 for s in result["sessions"].values() if s["acked"] and began <= s["acked"] < ended
        ),
        completed_held_through_outage=sum(
            1
            for s in result["sessions"].values()
            if s["acked"]
            and s["acked"] < began
            and s["status"] == "completed"
            and s["ended"] >= ended
        ),
        sessions_refused_during_outage=len(refused),
        sessions_acked=loss.acked,
        rows_lost=loss.rows_lost,
        error_frames=len(result["error_frames"]),
        during=latency_figures(result, began, ended),
        baseline=latency_figures(result, 0, began),
    )


async def _fill_queue(server: ServeProcess, pool: RawPool, bound: int, limit: int) -> int:
    """Register and drop clients (two queued writes each) until the queue reaches `bound`."""
    for i in range(limit):
        ws = await pool.connect()
        reply = await ws.register(f"filler-{i:04d}")
        assert reply["status"] == "ok", reply
        await ws.close()
        if i % 10 == 9 and server.health()["database"]["queue_depth"] >= bound:
            return i + 1
    raise AssertionError(f"queue did not reach {bound} after {limit} registrations")


async def _relay_device(ws: RawWs, client_id: str, stop: asyncio.Event) -> None:
    """Answers each task with task_end completed until `stop`."""
    while not stop.is_set():
        try:
            frame = await ws.recv_json(0.2)
        except TimeoutError:
            continue
        if frame["type"] == "task":
            await ws.send_json(
                type="task_end",
                status="completed",
                client_id=client_id,
                session_id=frame["session_id"],
                metadata={"result": "done"},
            )


async def _task(con: RawWs, client_id: str, target: str, session_id: str) -> list[dict[str, Any]]:
    """Send a TASK; the frames up to its task_end."""
    await con.send_json(
        type="task",
        status="continue",
        client_type="constellation",
        client_id=client_id,
        target_id=target,
        session_id=session_id,
        request="x",
    )
    frames = []
    while True:
        frame = await con.recv_json(30)
        frames.append(frame)
        if frame["type"] == "task_end" and frame["session_id"] == session_id:
            return frames


def test_at_the_queue_bound_new_sessions_are_refused_and_registrations_work(
    serve: Callable[..., ServeProcess],
    make_fault: Callable[..., Fault],
    db: Engine,
    backend: str,
) -> None:
    """At writer.max_queue a TASK gets an ERROR naming the bound (and task_end failed) at once,
    dispatch answers 503, registrations still work; after recovery sessions run again and
    every queued registration is in SQL."""
    bound = 200
    fault = make_fault()
    server = serve(env={**SERVER_ENV, "CCM_WRITER_MAX_QUEUE": str(bound)}, url=fault.url)

    async def scenario() -> dict[str, Any]:
        async with RawPool(server.port) as pool:
            return await steps(pool)

    async def steps(pool: RawPool) -> dict[str, Any]:
        device = await pool.connect()
        await device.register("bound-dev", metadata={"ccm_execution": "relay"})
        con = await pool.connect()
        await con.register(
            "bound-con@bound-dev", client_type="constellation", target_id="bound-dev"
        )
        stop = asyncio.Event()
        answering = asyncio.create_task(_relay_device(device, "bound-dev", stop))
        ok = await _task(con, "bound-con@bound-dev", "bound-dev", "before")
        assert ok[-1]["status"] == "completed", ok

        fault.begin()
        filled = await _fill_queue(server, pool, bound, 2000)
        health = await asyncio.to_thread(
            wait_until, lambda: (h := server.health())["status"] == "degraded" and h, 30, "degraded"
        )
        assert health["database"]["queue_depth"] >= bound
        asked = time.monotonic()
        refused = await _task(con, "bound-con@bound-dev", "bound-dev", "at-bound")
        refused_in = time.monotonic() - asked
        dispatch = await asyncio.to_thread(
            server.post, "/api/dispatch", {"client_id": "bound-dev", "request": "x"}
        )
        late = await pool.connect()
        late_reply = await late.register("late-dev")
        await late.send_json(type="heartbeat", client_id="late-dev")
        late_beat = await late.recv_json()
        fault.end()
        await asyncio.to_thread(server.wait_drained, 60)
        after = await _task(con, "bound-con@bound-dev", "bound-dev", "after")
        stop.set()
        await answering
        for ws in (late, con, device):
            await ws.close()
        return {
            "filled": filled,
            "refused": refused,
            "refused_in": refused_in,
            "dispatch": (dispatch.status_code, dispatch.json()),
            "late": (late_reply, late_beat),
            "after": after,
        }

    seen = asyncio.run(scenario())
    assert server.terminate() == 0, server.log()
    errors = [f for f in seen["refused"] if f["type"] == "error"]
    assert len(errors) == 1, seen["refused"]
    assert "new sessions are refused" in errors[0]["error"], seen["refused"]
    assert not any(f["type"] == "heartbeat" for f in seen["refused"]), "refused session was ACKed"
    assert seen["refused"][-1]["status"] == "failed"
    status, body = seen["dispatch"]
    assert status == 503, seen["dispatch"]
    assert "new sessions are refused" in body["detail"], seen["dispatch"]
    assert seen["late"][0]["status"] == "ok"
    assert seen["late"][1]["status"] == "ok"
    assert seen["after"][-1]["status"] == "completed", seen["after"]
    counts = connection_counts(db)
    assert all(counts.get(f"filler-{i:04d}") == 1 for i in range(seen["filled"])), "lost rows"
    assert counts.get("late-dev") == 1
    assert server.problems(*OUTAGE_LOG) == []
    record(
        "queue_bound",
        backend,
        fault=fault.name,
        max_queue=bound,
        registrations_to_fill=seen["filled"],
        refusal_ms=ms(seen["refused_in"]),
        refusal_error=errors[0]["error"],
        dispatch_status=status,
        rows_lost=0,
    )


def test_kill_9_during_an_outage_loses_no_completed_result(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    make_fault: Callable[..., Fault],
    db: Engine,
    backend: str,
) -> None:
    """A crash while the database is away: a client told `completed` finds the session
    `completed` in SQL. (A `completed` waits for its commit; failures go out at once.)"""
    fault = make_fault()
    server = serve(env=SERVER_ENV, url=fault.url)
    # Devices take up to a second per task, so sessions acknowledged before the outage end in it.
    load = loadgen(
        server.ws_url,
        "crashaway",
        devices=20,
        constellations=10,
        in_flight=2,
        task_delay=1.0,
        duration=600,
    )
    load.wait(lambda p: p["online"] >= 30 and p["acks"] >= 40, 60, "load running")
    fault.begin()
    began = time.time()
    wait_until(lambda: server.health()["status"] == "degraded", 30, "degraded", interval=0.1)
    time.sleep(scale(3.0, 10.0))
    server.kill()
    killed = time.time()
    fault.end()
    server.start()
    at_restart = load.progress()
    load.wait(lambda p: p["acks"] >= at_restart["acks"] + 30, 60, "new sessions after the restart")
    result = load.stop()
    assert server.terminate() == 0, server.log()
    loss = check_sessions(db, result)
    assert (loss.missing, loss.completed_lost, loss.not_finished, loss.duplicates) == (
        0,
        0,
        0,
        0,
    ), loss
    ended_in_outage = [
        s
        for s in result["sessions"].values()
        if s["ended"] is not None and began <= s["ended"] < killed
    ]
    assert server.problems(*OUTAGE_LOG) == []
    record(
        "crash_during_outage",
        backend,
        fault=fault.name,
        sessions_acked=loss.acked,
        completed_told=loss.completed_told,
        task_ends_during_outage=len(ended_in_outage),
        completed_told_during_outage=sum(1 for s in ended_in_outage if s["status"] == "completed"),
        rows_lost=loss.rows_lost,
    )
