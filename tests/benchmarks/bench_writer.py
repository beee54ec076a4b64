"""Store writer throughput: registrations + disconnects + session lifecycles per second.

Run: .venv/bin/python -m tests.benchmarks.bench_writer [--database-url URL] [--events N] [--repeats R]
Prints the median (and min-max) rows/s over R runs, and the in-memory registry's rate for scale.
Not collected by pytest: a figure, not a pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from ccm.registry import ClientConnectionManager, ClientType
from ccm.sessions import Mode, Origin, SessionManager
from ccm.store import Store, StoreWriter, migrate
from ccm.store.engine import make_engine


def one_run(url: str, n: int, batch_size: int) -> tuple[float, int]:
    """Queue n device connect/session/complete/disconnect cycles; time until all committed."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in ("sessions", "connections", "clients", "server_runs"):
            conn.execute(text(f"DELETE FROM {table}"))
    store = Store(engine, StoreWriter(engine, batch_size=batch_size, max_queue=10 * n))
    store.writer.start()
    registry = ClientConnectionManager(store=store)
    sessions = SessionManager(registry)
    started = time.perf_counter()
    for i in range(n):
        device = f"bench-device-{i}"
        registry.add_client(device, "linux", None, ClientType.DEVICE, {"system_info": {"i": i}})
        sessions.create(f"s-{i}", device, origin=Origin.DEVICE, mode=Mode.RELAY)
        sessions.complete(f"s-{i}", {"ok": True})
        registry.remove_client(device, reason="closed")
    store.writer.flush().result(600)
    elapsed = time.perf_counter() - started
    stats = store.writer.stats()
    store.writer.stop()
    engine.dispose()
    return stats.writes_committed / elapsed, stats.batches_committed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--events", type=int, default=5000, help="cycles per run (4 writes each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate.upgrade(url)
        rates = []
        for r in range(args.repeats):
            rate, batches = one_run(url, args.events, args.batch_size)
            rates.append(rate)
            print(f"run {r + 1}/{args.repeats}: {rate:,.0f} writes/s in {batches} transactions")
    print(
        f"writer throughput ({url.split(':')[0]}): median {statistics.median(rates):,.0f} writes/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}) over {args.repeats} runs of "
        f"{args.events * 4} writes, batch size {args.batch_size}"
    )


if __name__ == "__main__":
    main()
