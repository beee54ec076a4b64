"""(2) Relay throughput and latency: constellations -> ccm -> devices -> ccm -> constellations.

Three ccm servers run side by side: in memory (database.enabled false), SQLite and Postgres. The
same load generator (a separate process: 8 relay devices, 8 constellations, 64 sessions in
flight, closed loop) runs against each in turn, round-robin over the repeats, so a change in the
machine's load hits every mode alike. Each task is: TASK in, ACK out (after the session's row is
committed), `task` to the device, the device's `task_end` in, TASK_END out to both (after the
final state is committed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.benchmarks.common import Figure, Server, loadgen, log, start_ccm


def run(
    *, logs: Path, urls: dict[str, str | None], repeats: int, duration: float, warmup: float
) -> dict[str, Any]:
    """`urls`: mode -> database URL (None: in memory). Returns figures per mode."""
    servers: dict[str, Server] = {}
    try:
        for mode, url in urls.items():
            servers[mode] = start_ccm(f"relay-{mode}", logs, database_url=url, memory=url is None)
        figures: dict[str, dict[str, Figure]] = {
            mode: {
                "tasks_per_s": Figure(unit="tasks/s"),
                "p50_ms": Figure(unit="ms"),
                "p99_ms": Figure(unit="ms"),
                "server_cpu_us": Figure(unit="µs/task"),
                "loadgen_cpu_us": Figure(unit="µs/task"),
                "loop_busy_pct": Figure(unit="%"),
            }
            for mode in servers
        }
        errors = 0
        for r in range(repeats):
            for mode, server in servers.items():
                cpu0, loop0, wall0 = server.cpu(), server.loop_cpu(), time.monotonic()
                out = loadgen(
                    "relay",
                    server.url,
                    logs,
                    "--duration",
                    str(duration),
                    "--warmup",
                    str(warmup),
                    "--in-flight",
                    "64",
                    "--prefix",
                    f"r{r}{mode[:3]}",
                )
                cpu = server.cpu() - cpu0
                # The event-loop thread's CPU over the wall time of the run (start-up and
                # warm-up included): near 100% means the loop is the bound, well below means
                # the sessions in flight wait on something else (commits).
                loop_busy = (server.loop_cpu() - loop0) / (time.monotonic() - wall0) * 100
                f = figures[mode]
                f["tasks_per_s"].add(out["tasks_per_s"])
                f["p50_ms"].add(out["p50_ms"])
                f["p99_ms"].add(out["p99_ms"])
                f["server_cpu_us"].add(cpu / max(out["total_tasks"], 1) * 1e6)
                f["loadgen_cpu_us"].add(out["loadgen_cpu_per_task_us"])
                f["loop_busy_pct"].add(loop_busy)
                errors += out["errors"]
                log(
                    f"relay {mode} #{r + 1}: {out['tasks_per_s']:,.0f} tasks/s "
                    f"p50 {out['p50_ms']:.1f} ms p99 {out['p99_ms']:.1f} ms"
                )
        return {"figures": figures, "errors": errors}
    finally:
        for server in servers.values():
            server.stop()
