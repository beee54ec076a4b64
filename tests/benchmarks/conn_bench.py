"""(4) Connections: memory per idle registered connection, how many are held, registrations/s,
and a burst: that many devices connecting at once.

A fresh ccm (history persisted to SQLite) and the seed server each get `count` UFO devices that
register (200 at a time) and then stay idle. Memory per connection is the server's RSS growth over
that many connections, measured after a warm-up of connect/close cycles so that one-time
allocations (imports, pools, arenas) are not charged to the connections. Compression is off
(ccm's default; the seed server is started the same way).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ccm.store.engine import make_engine
from ccm.store.models import connections
from tests.benchmarks.common import Child, Server, loadgen, log, start_ccm, start_seed


def _hold(server: Server, logs: Path, count: int, concurrency: int) -> dict[str, Any]:
    loadgen(
        "cycles",
        server.url,
        logs,
        "--duration",
        "1.5",
        "--workers",
        "16",
        "--prefix",
        f"warm{server.name}",
    )
    time.sleep(1.0)
    rss0 = server.rss()
    child = Child(
        [
            "-m",
            "tests.benchmarks.loadgen",
            "idle",
            "--url",
            server.url,
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--prefix",
            f"idle{server.name}",
        ],
        log=logs / "loadgen-idle.log",
    )
    try:
        held = child.read_json(600)
        time.sleep(2.0)  # let the server finish what registration queued
        rss1 = server.rss()
        child.say("close")
        closed = child.read_json(120)
        child.wait(60)
    finally:
        child.stop()
    per_conn = (rss1 - rss0) / max(held["held"], 1)
    log(
        f"{server.name}: {held['held']:,} connections held, {held['registrations_per_s']:,.0f} "
        f"registrations/s, {per_conn / 1024:.1f} KiB each"
    )
    return {
        "held": held["held"],
        "failures": held["failures"],
        "registrations_per_s": held["registrations_per_s"],
        "rss_before": rss0,
        "rss_after": rss1,
        "bytes_per_connection": per_conn,
        "alive_at_end": closed["alive_at_end"],
    }


def burst(*, logs: Path, sqlite_url: str, count: int) -> dict[str, Any]:
    """`count` devices connect to a fresh ccm (SQLite) at once and retry until registered (the
    reconnect storm after a restart): seconds until the last is registered, and until all of
    their connection rows are committed."""
    server = start_ccm("burst-ccm", logs, database_url=sqlite_url)
    engine = make_engine(sqlite_url)
    child = Child(
        [
            "-m",
            "tests.benchmarks.loadgen",
            "burst",
            "--url",
            server.url,
            "--count",
            str(count),
            "--prefix",
            "storm",
            "--addresses",
            str(max(1, count // 10)),
        ],
        log=logs / "loadgen-burst.log",
    )
    try:
        done = child.read_json(300)
        rows = 0
        while time.time() - done["started_at"] < 300:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(func.count())
                    .select_from(connections)
                    .where(connections.c.client_id.like("storm-burst-%"))
                ).scalar_one()
            if rows >= done["held"]:
                break
            time.sleep(0.1)
        persisted = time.time() - done["started_at"]
        child.say("close")
        child.read_json(120)
        child.wait(60)
    finally:
        child.stop()
        server.stop()
        engine.dispose()
    log(
        f"burst: {done['held']:,} of {count:,} registered in {done['seconds']:.1f} s "
        f"({done['retries']:,} retries), all persisted after {persisted:.1f} s"
    )
    return {
        "count": count,
        "registered": done["held"],
        "retries": done["retries"],
        "registered_s": done["seconds"],
        "persisted_s": persisted,
        "rows": rows,
    }


def run(*, logs: Path, sqlite_url: str, count: int, concurrency: int = 200) -> dict[str, Any]:
    out: dict[str, Any] = {"count": count}
    for name in ("ccm", "seed"):
        server = (
            start_ccm("conn-ccm", logs, database_url=sqlite_url)
            if name == "ccm"
            else start_seed(logs)
        )
        try:
            out[name] = _hold(server, logs, count, concurrency)
        finally:
            server.stop()
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        out["ccm"]["connection_rows"] = conn.execute(
            select(func.count())
            .select_from(connections)
            .where(connections.c.client_id.like("idleconn-ccm-idle-%"))
        ).scalar_one()
    engine.dispose()
    out["burst"] = burst(logs=logs, sqlite_url=sqlite_url, count=count)
    return out
