"""Store writer throughput: registrations + disconnects + session lifecycles per second.

Run: .venv/bin/python -m tests.benchmarks.bench_writer [--database-url URL] [--events N]
     [--repeats R] [--mode cycle|relay]
`cycle`: each event is a device that connects, runs one session and leaves (4 writes).
`relay`: each event is one relayed session on one of 20 connected devices (create + end).
Prints the median (and min-max) writes/s over R runs, and the CPU the writer thread used per
event (it shares the GIL with the event loop in the server, so this is what relaying pays).
Not collected by pytest: a figure, not a pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from ccm.domain import ClientType, Mode, Origin
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter, migrate
from ccm.store.engine import make_engine


class _TimedWriter(StoreWriter):
    """A StoreWriter that records the CPU time its thread used."""

    cpu_seconds = 0.0

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self.cpu_seconds = time.thread_time()


def one_run(url: str, n: int, batch_size: int, mode: str = "cycle") -> tuple[float, int, float]:
    """Queue n events (see the module doc); time until all committed. Returns writes/s,
    transactions, and writer-thread CPU seconds per event."""
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in ("sessions", "connections", "clients", "server_runs"):
            conn.execute(text(f"DELETE FROM {table}"))
    writer = _TimedWriter(engine, batch_size=batch_size, max_queue=10 * n)
    store = Store(engine, writer)
    registry = ClientConnectionManager(store=store)
    sessions = SessionManager(registry, store=store)
    if mode == "relay":
        for d in range(20):
            registry.add_client(f"bench-device-{d}", "linux", None, ClientType.DEVICE)
        writer.flush().result(600)  # not started yet: applied inline, outside the timing
    before = writer.stats()
    writer.start()
    started = time.perf_counter()
    for i in range(n):
        if mode == "relay":
            sessions.create(
                f"s-{i}", f"bench-device-{i % 20}", origin=Origin.DEVICE, mode=Mode.RELAY
            )
            sessions.complete(f"s-{i}", {"ok": True})
            continue
        device = f"bench-device-{i}"
        registry.add_client(device, "linux", None, ClientType.DEVICE, {"system_info": {"i": i}})
        sessions.create(f"s-{i}", device, origin=Origin.DEVICE, mode=Mode.RELAY)
        sessions.complete(f"s-{i}", {"ok": True})
        registry.remove_client(device, reason="closed")
    writer.flush().result(600)
    elapsed = time.perf_counter() - started
    stats = writer.stats()
    writer.stop()
    engine.dispose()
    return (
        (stats.writes_committed - before.writes_committed) / elapsed,
        stats.batches_committed - before.batches_committed,
        writer.cpu_seconds / n,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--events", type=int, default=5000, help="events per run")
    parser.add_argument("--mode", choices=["cycle", "relay"], default="cycle")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate.upgrade(url)
        rates, cpus = [], []
        for r in range(args.repeats):
            rate, batches, cpu = one_run(url, args.events, args.batch_size, args.mode)
            rates.append(rate)
            cpus.append(cpu * 1e6)
            print(
                f"run {r + 1}/{args.repeats}: {rate:,.0f} writes/s in {batches} transactions, "
                f"writer thread {cpu * 1e6:,.0f} us CPU per event"
            )
    print(
        f"writer throughput ({url.split(':')[0]}, {args.mode}): median "
        f"{statistics.median(rates):,.0f} writes/s (min {min(rates):,.0f}, max {max(rates):,.0f}); "
        f"writer thread CPU median {statistics.median(cpus):,.0f} us per event "
        f"(min {min(cpus):,.0f}, max {max(cpus):,.0f}); {args.repeats} runs of {args.events} "
        f"events, batch size {args.batch_size}"
    )


if __name__ == "__main__":
    main()
