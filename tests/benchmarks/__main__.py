"""The benchmark suite: one command, one table, RESULTS.md regenerated.

    .venv/bin/python -m tests.benchmarks            # full run (< 10 min), writes RESULTS.md
    .venv/bin/python -m tests.benchmarks --quick    # short run (~3 min), prints the table only
    options: --only registry,relay,peer,connections,cleanup,profile,cluster  --postgres-url URL
             --output PATH  --keep-logs

Every figure is the median of repeats in this run with its min-max; ratios compare figures of
the same run. Servers and the load generator are separate processes on loopback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.benchmarks import report
from tests.benchmarks.common import (
    DEFAULT_POSTGRES_URL,
    log,
    machine,
    raise_nofile_limit,
    sqlite_database,
)
from tests.support import postgres_available, postgres_database

SECTIONS = ("registry", "relay", "peer", "connections", "cleanup", "profile", "cluster")

FULL = {
    "registry_repeats": 7,
    "relay_repeats": 3,
    "relay_duration": 5.0,
    "relay_warmup": 1.0,
    "peer_repeats": 3,
    "peer_duration": 3.0,
    "connections": 10_000,
    "cleanup_rows": 1_000_000,
    "cleanup_baseline": 8.0,
    "audit_samples": 40,
    "cluster_repeats": 3,
    "cluster_duration": 5.0,
    "cluster_cycles_duration": 3.0,
    "failover_devices": 2_000,
}
QUICK = {
    "registry_repeats": 3,
    "relay_repeats": 2,
    "relay_duration": 2.0,
    "relay_warmup": 0.5,
    "peer_repeats": 2,
    "peer_duration": 1.5,
    "connections": 2_000,
    "cleanup_rows": 100_000,
    "cleanup_baseline": 2.0,
    "audit_samples": 15,
    "cluster_repeats": 2,
    "cluster_duration": 2.0,
    "cluster_cycles_duration": 1.5,
    "failover_devices": 200,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short run; RESULTS.md untouched")
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument(
        "--output",
        default=None,
        help="default: tests/benchmarks/RESULTS.md "
        "for a full run of every section, nothing for --quick",
    )
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    cfg = QUICK if args.quick else FULL
    raise_nofile_limit()
    started = time.perf_counter()
    logs = Path(tempfile.mkdtemp(prefix="ccm-bench-"))
    log(f"logs in {logs}")
    results: dict[str, Any] = {
        "machine": machine(),
        "config": cfg,
        "quick": args.quick,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m tests.benchmarks" + (" --quick" if args.quick else ""),
    }
    pg_ok = postgres_available(args.postgres_url)
    results["postgres"] = args.postgres_url.split("@")[-1] if pg_ok else None
    if not pg_ok:
        log(f"PostgreSQL not reachable at {args.postgres_url}: its figures are skipped")
    ok = False
    try:
        with ExitStack() as dbs:
            pg_url = (
                dbs.enter_context(postgres_database(args.postgres_url, "ccm_bench"))
                if pg_ok
                else None
            )
            if "registry" in only:
                from tests.benchmarks import registry_bench

                log("registry: 10,000 devices")
                results["registry"] = registry_bench.run(
                    repeats=cfg["registry_repeats"], quick=args.quick
                )
            if "relay" in only:
                from tests.benchmarks import relay_bench

                urls: dict[str, str | None] = {
                    "memory": None,
                    "sqlite": sqlite_database(logs, "relay.db"),
                }
                if pg_url:
                    urls["postgres"] = pg_url
                results["relay"] = relay_bench.run(
                    logs=logs,
                    urls=urls,
                    repeats=cfg["relay_repeats"],
                    duration=cfg["relay_duration"],
                    warmup=cfg["relay_warmup"],
                )
            if "peer" in only:
                from tests.benchmarks import peer_bench

                results["peer"] = peer_bench.run(
                    logs=logs,
                    sqlite_url=sqlite_database(logs, "peer.db"),
                    repeats=cfg["peer_repeats"],
                    duration=cfg["peer_duration"],
                )
            if "connections" in only:
                from tests.benchmarks import conn_bench

                results["connections"] = conn_bench.run(
                    logs=logs,
                    sqlite_url=sqlite_database(logs, "conn.db"),
                    count=cfg["connections"],
                )
            if "cleanup" in only:
                from tests.benchmarks import cleanup_bench

                rate = _live_rate(results)
                results["cleanup"] = {}
                backends = {"sqlite": sqlite_database(logs, "cleanup.db")}
                if pg_url:
                    # a database of its own: cleanup must not see the relay run's rows
                    backends["postgres"] = dbs.enter_context(
                        postgres_database(args.postgres_url, "ccm_bench")
                    )
                for name, url in backends.items():
                    results["cleanup"][name] = cleanup_bench.run_backend(
                        name,
                        url,
                        logs=logs,
                        rows=cfg["cleanup_rows"],
                        rate=rate,
                        baseline=cfg["cleanup_baseline"],
                        batch_size=5000,
                        audit_samples=cfg["audit_samples"],
                    )
            if "profile" in only:
                from tests.benchmarks import profile

                log("profile: py-spy on the SQLite relay server")
                results["profile"] = profile.run(
                    logs=logs,
                    sqlite_url=sqlite_database(logs, "profile.db"),
                    seconds=3.0 if args.quick else 5.0,
                )
            if "cluster" in only:
                if pg_url is None:
                    reason = f"PostgreSQL not reachable at {args.postgres_url}"
                    log(f"cluster: skipped, {reason} (a cluster needs PostgreSQL)")
                    results["cluster"] = {"skipped": reason}
                else:
                    from tests.benchmarks import cluster_bench

                    log(f"cluster: 2 nodes on PostgreSQL, {cfg['failover_devices']:,} to fail over")
                    results["cluster"] = cluster_bench.run(
                        logs=logs,
                        # databases of their own: no other section's rows or nodes
                        cluster_url=dbs.enter_context(
                            postgres_database(args.postgres_url, "ccm_bench")
                        ),
                        single_url=dbs.enter_context(
                            postgres_database(args.postgres_url, "ccm_bench")
                        ),
                        repeats=cfg["cluster_repeats"],
                        duration=cfg["cluster_duration"],
                        warmup=cfg["relay_warmup"],
                        cycles_duration=cfg["cluster_cycles_duration"],
                        failover_devices=cfg["failover_devices"],
                    )
        ok = True
    finally:
        results["runtime_s"] = time.perf_counter() - started
        table = report.table(results)
        print(table)
        output = args.output
        if output is None and not args.quick and set(only) == set(SECTIONS) and ok:
            output = str(Path(__file__).parent / "RESULTS.md")
        if output:
            Path(output).write_text(report.markdown(results), encoding="utf-8")
            log(f"wrote {output}")
        log(f"runtime {results['runtime_s']:.0f} s")
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            log(f"logs kept in {logs}")
    sys.exit(0 if ok else 1)


def _live_rate(results: dict[str, Any]) -> float:
    """Live relay load during cleanup: 40% of the SQLite capacity measured in this run."""
    try:
        capacity = results["relay"]["figures"]["sqlite"]["tasks_per_s"].median
    except (KeyError, TypeError):
        capacity = 1000.0
    return max(50.0, round(0.4 * capacity, -1))


if __name__ == "__main__":
    main()
