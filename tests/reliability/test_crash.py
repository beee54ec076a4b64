"""Crash: `kill -9` the server under load at different points, restart it, and check in SQL that
nothing a client was told is lost.

A load generator process (>= 200 relay devices, >= 20 constellations with sessions in flight)
keeps running across the kills and reconnects by itself. After the last restart the run ends
cleanly and SQL must show: every session whose ACK a client received, in a final state (or
`interrupted` by the restart); every task_end `completed` a client received as `completed`; no
connection row left open, the killed runs' ones closed as `server_restart`; a sound database.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import connections, server_runs
from tests.reliability.support import (
    LoadGen,
    ServeProcess,
    check_sessions,
    disconnect_reasons,
    integrity_check,
    latency_figures,
    open_connections,
    record,
    scale,
    session_rows,
)

DEVICES = 200
CONSTELLATIONS = 20
KILL_RUNS = scale(2, 6)
STEADY_ACKS = scale(150, 500)
CLIENTS = DEVICES + CONSTELLATIONS


class Crasher:
    """Kills and restarts one server, remembering the run ids it killed."""

    def __init__(self, server: ServeProcess, load: LoadGen, rng: random.Random) -> None:
        self.server = server
        self.load = load
        self.rng = rng
        self.killed_runs: list[str] = []

    def kill_and_restart(self, *, during_shutdown: bool = False) -> dict[str, Any]:
        self.killed_runs.append(str(self.server.health()["run_id"]))
        if during_shutdown:
            self.server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            time.sleep(self.rng.uniform(0.05, 0.3))
        at_kill = self.load.progress()
        self.server.kill()
        self.server.start()
        return at_kill

    # Kill points: each waits for its moment, kills, and restarts.

    def steady_load(self) -> dict[str, Any]:
        start = self.load.progress()
        self.load.wait(lambda p: p["acks"] >= start["acks"] + STEADY_ACKS, 60, "new session ACKs")
        time.sleep(self.rng.uniform(0, 0.5))
        return self.kill_and_restart()

    def mid_reregistration(self) -> dict[str, Any]:
        start = self.kill_and_restart()
        self.load.wait(
            lambda p: p["registrations"] >= start["registrations"] + CLIENTS // 3,
            60,
            "a third of the clients re-registered",
        )
        return self.kill_and_restart()

    def first_sessions_after_restart(self) -> dict[str, Any]:
        start = self.kill_and_restart()
        self.load.wait(lambda p: p["acks"] > start["acks"], 60, "the first new session ACK")
        return self.kill_and_restart()

    def during_graceful_shutdown(self) -> dict[str, Any]:
        start = self.load.progress()
        self.load.wait(lambda p: p["acks"] >= start["acks"] + 100, 60, "100 new session ACKs")
        return self.kill_and_restart(during_shutdown=True)

    def right_after_start(self) -> dict[str, Any]:
        self.kill_and_restart()
        time.sleep(self.rng.uniform(0, 0.2))
        return self.kill_and_restart()


KILL_POINTS = [
    "steady_load",
    "mid_reregistration",
    "first_sessions_after_restart",
    "during_graceful_shutdown",
    "right_after_start",
    "steady_load",
]


def test_kill_9_under_load_loses_nothing_acknowledged(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
) -> None:
    """Every ACKed session survives kill -9 in SQL; no connection row stays open; clients
    reconnect and new sessions run after every restart."""
    rng = random.Random(4)
    env = {"CCM_SERVER_HEARTBEAT_INTERVAL": "30s"}
    server = serve(env=env)
    load = loadgen(
        server.ws_url,
        "crash",
        devices=DEVICES,
        constellations=CONSTELLATIONS,
        in_flight=2,
        duration=900,
    )
    load.wait(lambda p: p["online"] >= CLIENTS and p["acks"] >= 50, 90, "all clients and 50 ACKs")
    crasher = Crasher(server, load, rng)
    runs: list[dict[str, Any]] = []
    for k in range(KILL_RUNS):
        point = KILL_POINTS[k % len(KILL_POINTS)]
        synchronous = "FULL" if backend == "sqlite" and k % 2 == 1 else "NORMAL"
        server.env["CCM_DATABASE_SQLITE_SYNCHRONOUS"] = synchronous
        kills_before = len(crasher.killed_runs)
        at_kill = getattr(crasher, point)()
        restarted = time.monotonic()
        back = load.wait(
            lambda p, a=at_kill: p["online"] >= CLIENTS and p["acks"] >= a["acks"] + 50,
            90,
            "every client back and 50 new session ACKs",
        )
        runs.append(
            {
                "kill_point": point.replace("_", " "),
                "kills": len(crasher.killed_runs) - kills_before,
                "reconnected_in_s": round(time.monotonic() - restarted, 2),
                "acks_after_restart": back["acks"] - at_kill["acks"],
                "sqlite_synchronous": synchronous if backend == "sqlite" else None,
            }
        )
    killed_runs = crasher.killed_runs

    result = load.stop()
    assert server.terminate() == 0, server.log()

    loss = check_sessions(db, result)
    assert loss.missing == 0, loss
    assert loss.completed_lost == 0, loss
    assert loss.not_finished == 0, loss
    assert loss.duplicates == 0, loss
    rows = session_rows(db)
    interrupted = sum(
        1
        for sid, s in result["sessions"].items()
        if s["acked"] and rows[sid][-1]["reason"] == "server_restart"
    )
    assert open_connections(db) == {}, "connection rows left open"
    for run_id in killed_runs:
        reasons = disconnect_reasons(db, server_run_id=run_id)
        assert reasons.get("server_restart", 0) > 0, reasons
        assert set(reasons) <= {"server_restart", "server_shutdown", "closed", "connection_lost"}, (
            reasons
        )
    with db.connect() as conn:
        stopped = conn.execute(select(server_runs.c.stopped_at)).scalars().all()
        rows_total = conn.execute(select(connections.c.connection_id)).all()
    assert len(stopped) == len(killed_runs) + 1
    assert all(s is not None for s in stopped)
    assert integrity_check(db) == "ok"
    assert server.problems() == []
    record(
        "crash",
        backend,
        kill_runs=KILL_RUNS,
        kills=len(killed_runs),
        runs=runs,
        clients=CLIENTS,
        sessions_sent=len(result["sessions"]),
        sessions_acked=loss.acked,
        sessions_completed_told=loss.completed_told,
        acked_interrupted_by_kill=interrupted,
        rows_lost=loss.rows_lost,
        connection_rows=len(rows_total),
        integrity="ok",
        error_frames=len(result["error_frames"]),
        **latency_figures(result),
    )
