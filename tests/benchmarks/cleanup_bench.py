"""(5) Cleanup and audit at scale, on SQLite and Postgres.

For each backend: a fresh database gets `rows` finished sessions (ended more than a week ago) and
`rows` closed connections (bulk.py). The two audit queries from README run through the same
functions the HTTP API uses, on many different clients/devices, with their query plans. Then a
ccm server runs on that database under a live relay load at a fixed rate (below capacity: live
traffic, not a saturation test), and `ccm cleanup --finished-before 7d` (the same function, in
this process: a separate process from the server, as the CLI is) deletes the old sessions while
the load goes on, for at most `live_budget` seconds. The relay p99 of tasks finished during the
cleanup is compared with the p99 before it, and the deletion rate under load is rows deleted
over that time. On SQLite, paced for the live server, it deletes about 1,000 to 2,000 rows/s,
so the budget ends it early: the rest is then deleted after the load has stopped, and that
(idle) rate is reported too.
"""

from __future__ import annotations

import random
import time
from array import array
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, text

from ccm.maintenance import run_cleanup
from ccm.store.engine import make_engine
from ccm.store.models import sessions
from ccm.store.repository import read_connection_history, read_sessions
from tests.benchmarks import bulk
from tests.benchmarks.common import Child, Figure, log, percentile, start_ccm


def _explain(engine: Engine, query: Any) -> str:
    compiled = query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {compiled}")).all()
            return "\n".join(r[0] for r in rows)
        rows = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
        return "\n".join(str(r[-1]) for r in rows)


def audit(engine: Engine, *, devices: int, days: int, samples: int) -> dict[str, Any]:
    """Latency of the two README audit questions, on `samples` different clients/days."""
    from sqlalchemy import select as sa_select

    from ccm.store.models import connections

    rng = random.Random(7)
    start = bulk.history_start(datetime.now(UTC), days)
    history, day_sessions = Figure(unit="ms"), Figure(unit="ms")
    rows_seen = {"history": 0, "day": 0}
    for _ in range(samples):
        client = f"hist-dev-{rng.randrange(devices):04d}"
        t0 = time.perf_counter()
        rows = read_connection_history(engine, client, limit=50)
        history.add((time.perf_counter() - t0) * 1000)
        rows_seen["history"] += len(rows)
        day = start + timedelta(days=rng.randrange(days))
        t0 = time.perf_counter()
        found = read_sessions(
            engine, device_id=client, since=day, until=day + timedelta(days=1), limit=1000
        )
        day_sessions.add((time.perf_counter() - t0) * 1000)
        rows_seen["day"] += len(found)
    day = start + timedelta(days=3)
    plans = {
        "connection history": _explain(
            engine,
            sa_select(*connections.c)
            .where(connections.c.client_id == "hist-dev-0042")
            .order_by(connections.c.connected_at.desc())
            .limit(50),
        ),
        "sessions of a device in a day": _explain(
            engine,
            sa_select(*sessions.c)
            .where(sessions.c.device_id == "hist-dev-0042")
            .where(sessions.c.created_at >= day)
            .where(sessions.c.created_at < day + timedelta(days=1))
            .order_by(sessions.c.created_at.desc(), sessions.c.id)
            .limit(1000),
        ),
    }
    return {
        "connection_history_ms": history,
        "device_day_ms": day_sessions,
        "rows_per_query": {k: v / samples for k, v in rows_seen.items()},
        "plans": plans,
    }


def _samples(path: Path) -> tuple[list[float], list[float]]:
    data = array("d")
    with open(path, "rb") as f:
        data.frombytes(f.read())
    n = int(data[0])
    return list(data[1 : 1 + n]), list(data[1 + n : 1 + 2 * n])


class _OutOfTime(Exception):
    """Raised from the progress callback to end a cleanup at its time budget."""


def _cleanup_for(engine: Engine, budget: float, batch_size: int) -> tuple[int, float, bool]:
    """run_cleanup on sessions finished more than 7 days ago, for at most `budget` seconds
    (it stops after the batch that crosses it). Returns (rows deleted, seconds, finished)."""
    deleted = 0
    started = time.perf_counter()
    deadline = started + budget

    def progress(_table: str, n: int) -> None:
        nonlocal deleted
        deleted += n
        if time.perf_counter() >= deadline:
            raise _OutOfTime

    try:
        run_cleanup(
            engine,
            sessions_before=datetime.now(UTC) - timedelta(days=7),
            batch_size=batch_size,
            progress=progress,
        )
        finished = True
    except _OutOfTime:
        finished = False
    return deleted, time.perf_counter() - started, finished


def run_backend(
    name: str,
    url: str,
    *,
    logs: Path,
    rows: int,
    rate: float,
    baseline: float,
    batch_size: int,
    audit_samples: int,
    live_budget: float = 30.0,
) -> dict[str, Any]:
    devices, days = 1000, 30
    engine = make_engine(url)
    out: dict[str, Any] = {"rows": rows}
    try:
        log(f"cleanup {name}: inserting {rows:,} sessions and {rows:,} connections")
        out["fill"] = bulk.fill(engine, sessions=rows, connections=rows, devices=devices, days=days)
        out["audit"] = audit(engine, devices=devices, days=days, samples=audit_samples)
        log(
            f"cleanup {name}: audit history {out['audit']['connection_history_ms'].show()}, "
            f"device-day {out['audit']['device_day_ms'].show()}"
        )
        server = start_ccm(f"cleanup-{name}", logs, database_url=url)
        samples_file = logs / f"cleanup-{name}.samples"
        lg = Child(
            [
                "-m",
                "tests.benchmarks.loadgen",
                "relay",
                "--url",
                server.url,
                "--in-flight",
                "64",
                "--rate",
                str(rate),
                "--warmup",
                "1.5",
                "--until-stdin",
                "--samples",
                str(samples_file),
                "--prefix",
                f"cl{name[:3]}",
            ],
            log=logs / "loadgen-cleanup.log",
        )
        try:
            lg.read_json(60)  # measuring started
            time.sleep(baseline)
            c0 = time.monotonic()
            deleted, elapsed, finished = _cleanup_for(engine, live_budget, batch_size)
            c1 = time.monotonic()
            time.sleep(1.0)
            lg.say("stop")
            relay = lg.read_json(60)
            lg.wait(30)
        finally:
            lg.stop()
            server.stop()
        idle_deleted, idle_seconds = 0, 0.0
        if not finished:
            log(
                f"cleanup {name}: {deleted:,} rows in the {live_budget:.0f} s budget under load; "
                "the rest with no load"
            )
            idle_deleted, idle_seconds, _ = _cleanup_for(engine, float("inf"), batch_size)
        finish, latency = _samples(samples_file)
        before = [lat * 1000 for t, lat in zip(finish, latency, strict=True) if t < c0]
        during = [lat * 1000 for t, lat in zip(finish, latency, strict=True) if c0 <= t <= c1]
        with engine.connect() as conn:
            left = conn.execute(
                select(func.count())
                .select_from(sessions)
                .where(sessions.c.session_id.like("hist-%"))
            ).scalar_one()
        out.update(
            deleted=deleted,
            left=left,
            seconds=elapsed,
            rows_per_s=deleted / elapsed,
            live_budget_s=live_budget,
            finished_under_load=finished,
            idle_deleted=idle_deleted,
            idle_seconds=idle_seconds,
            idle_rows_per_s=idle_deleted / idle_seconds if idle_seconds else None,
            relay_rate=rate,
            relay_tasks_per_s=relay["tasks_per_s"],
            relay_errors=relay["errors"],
            p99_before_ms=percentile(before, 99),
            p99_during_ms=percentile(during, 99),
            p50_before_ms=percentile(before, 50),
            p50_during_ms=percentile(during, 50),
            tasks_before=len(before),
            tasks_during=len(during),
        )
        log(
            f"cleanup {name}: {out['deleted']:,} rows in {elapsed:.1f} s under load "
            f"({out['rows_per_s']:,.0f} rows/s); relay p99 {out['p99_before_ms']:.1f} -> "
            f"{out['p99_during_ms']:.1f} ms"
            + (
                f"; then {idle_deleted:,} rows in {idle_seconds:.1f} s with no load "
                f"({out['idle_rows_per_s']:,.0f} rows/s)"
                if idle_seconds
                else ""
            )
        )
        return out
    finally:
        engine.dispose()
