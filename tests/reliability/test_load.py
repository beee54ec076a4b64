"""Load and leaks: thousands of concurrent connections registering, heartbeating and relaying
for a while, then back to idle, several times over. After each return to idle: the registry
and the session maps are empty, SQL has no open row, the server holds no more file descriptors
than after the first cycle, and its RSS does not keep growing from cycle to cycle."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, select

from ccm.store.models import sessions
from tests.reliability.support import (
    LoadGen,
    ServeProcess,
    check_sessions,
    latency_figures,
    online_in_sql,
    open_connections,
    record,
    scale,
    wait_until,
)

CONNECTIONS = scale(400, 2000)
CONSTELLATIONS = scale(40, 200)
HOLD = scale(1.0, 20.0)
CYCLES = 3
MB = 1024 * 1024


def _idle(server: ServeProcess) -> dict[str, Any]:
    """Wait until nothing is live, then measure the process."""

    def empty() -> dict[str, Any] | None:
        stats = server.get("/api/stats")
        quiet = (
            stats["total"] == 0 and stats["active_sessions"] == 0 and stats["live_sessions"] == 0
        )
        return stats if quiet else None

    stats = wait_until(empty, 60, "the registry and session maps to empty", interval=0.2)
    server.wait_drained()
    time.sleep(1.0)  # let closing sockets finish
    return {"rss_mb": round(server.rss_bytes() / MB, 1), "fds": server.fd_count(), "stats": stats}


def test_connections_come_and_go_without_leaks(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
) -> None:
    """RSS, fds, registry and session maps return to the same idle level after every cycle."""
    server = serve(env={"CCM_SERVER_HEARTBEAT_INTERVAL": "60s"})
    cycles: list[dict[str, Any]] = []
    for cycle in range(CYCLES):
        load = loadgen(
            server.ws_url,
            f"leak{cycle}",
            devices=CONNECTIONS - CONSTELLATIONS,
            constellations=CONSTELLATIONS,
            heartbeat=scale(2.0, 5.0),
            in_flight=1,
            constellation_delay=1.0,
            duration=600,
        )
        started = time.monotonic()
        load.wait(lambda p: p["online"] >= CONNECTIONS, 180, f"{CONNECTIONS} clients online")
        connected_in = time.monotonic() - started
        time.sleep(HOLD)
        peak = {
            "rss_mb": round(server.rss_bytes() / MB, 1),
            "fds": server.fd_count(),
            "live": server.get("/api/stats")["total"],
        }
        result = load.stop()
        loss = check_sessions(db, result)
        assert (loss.missing, loss.completed_lost, loss.not_finished) == (0, 0, 0), loss
        assert result["error_frames"] == []
        idle = _idle(server)
        cycles.append(
            {
                "connected_in_s": round(connected_in, 1),
                "peak": peak,
                "idle": {k: v for k, v in idle.items() if k != "stats"},
                "sessions": len(result["sessions"]),
                **latency_figures(result),
            }
        )
    assert open_connections(db) == {}
    assert online_in_sql(db) == set()
    with db.connect() as conn:
        live_rows = conn.execute(
            select(func.count()).where(sessions.c.state.in_(["pending", "running"]))
        ).scalar()
    assert live_rows == 0
    assert server.terminate() == 0, server.log()
    assert server.problems() == []
    assert all(c["peak"]["live"] >= CONNECTIONS for c in cycles)
    first, last = cycles[0]["idle"], cycles[-1]["idle"]
    assert last["fds"] <= first["fds"] + 3, cycles
    per_cycle = cycles[0]["peak"]["rss_mb"] - first["rss_mb"]
    growth = last["rss_mb"] - cycles[1]["idle"]["rss_mb"]
    # A leak proportional to the connections would grow RSS by a similar step every cycle.
    assert growth <= max(20.0, 0.25 * max(per_cycle, 0.0)), cycles
    record(
        "load_and_leaks",
        backend,
        connections=CONNECTIONS,
        cycles=cycles,
        rss_growth_last_cycle_mb=round(growth, 1),
    )
