"""(6) Cluster: two ccm nodes on one PostgreSQL database, in one run.

- Relay across nodes: the relay load generator of (2) (8 relay devices, 8 constellations, 64
  sessions in flight, closed loop) with devices and constellations on node A ("same node"),
  then with the devices on A and the constellations on B ("cross node": every ACK and
  TASK_END crosses the bus), round-robin over the repeats.
- Registrations per second: the connect/register/close cycles of (3) (32 workers) on node A
  of the cluster (B alive: each REGISTER claims its id in the database) and on a single node
  alone on its own PostgreSQL database, round-robin over the repeats.
- Failover: N devices registered on A; A is killed (SIGKILL); every device reconnects to B's
  address and registers its id again, retrying once a second while it is refused. The figure
  is the time from the kill until the last one is registered on B.

Nodes run as `ccm serve` does (server_proc); the lease is the default (10 s).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.benchmarks.common import Child, Figure, Server, loadgen, log, start_ccm

RELAY_MODES = ("same", "cross")
REG_MODES = ("cluster", "single")


def _node(name: str, logs: Path, url: str) -> Server:
    return start_ccm(name, logs, database_url=url, extra=["--set", f"cluster.node_name={name}"])


def run(
    *,
    logs: Path,
    cluster_url: str,
    single_url: str,
    repeats: int,
    duration: float,
    warmup: float,
    cycles_duration: float,
    failover_devices: int,
) -> dict[str, Any]:
    """`cluster_url`: the database of the two nodes; `single_url`: another one, for the lone
    node the registrations are compared with."""
    servers: list[Server] = []
    try:
        a = _node("cluster-a", logs, cluster_url)
        servers.append(a)
        b = _node("cluster-b", logs, cluster_url)
        servers.append(b)
        single = _node("cluster-single", logs, single_url)
        servers.append(single)
        relay = _relay(a, b, logs, repeats, duration, warmup)
        registrations = _registrations(a, single, logs, repeats, cycles_duration)
        single.stop()
        failover = _failover(a, b, logs, failover_devices)
        return {"relay": relay, "registrations": registrations, "failover": failover}
    finally:
        for server in servers:
            server.stop()


def _relay(
    a: Server, b: Server, logs: Path, repeats: int, duration: float, warmup: float
) -> dict[str, Any]:
    figures = {
        mode: {
            "tasks_per_s": Figure(unit="tasks/s"),
            "p50_ms": Figure(unit="ms"),
            "p99_ms": Figure(unit="ms"),
            "server_cpu_us": Figure(unit="µs/task"),
        }
        for mode in RELAY_MODES
    }
    errors = 0
    for r in range(repeats):
        for mode in RELAY_MODES:
            constellations = a if mode == "same" else b
            cpu0 = a.cpu() + b.cpu()
            out = loadgen(
                "relay",
                a.url,
                logs,
                "--constellation-url",
                constellations.url,
                "--duration",
                str(duration),
                "--warmup",
                str(warmup),
                "--in-flight",
                "64",
                "--prefix",
                f"cl{r}{mode}",
            )
            cpu = a.cpu() + b.cpu() - cpu0
            f = figures[mode]
            f["tasks_per_s"].add(out["tasks_per_s"])
            f["p50_ms"].add(out["p50_ms"])
            f["p99_ms"].add(out["p99_ms"])
            f["server_cpu_us"].add(cpu / max(out["total_tasks"], 1) * 1e6)
            errors += out["errors"]
            log(
                f"cluster relay {mode}-node #{r + 1}: {out['tasks_per_s']:,.0f} tasks/s "
                f"p50 {out['p50_ms']:.1f} ms p99 {out['p99_ms']:.1f} ms"
            )
    return {"figures": figures, "errors": errors}


def _registrations(
    a: Server, single: Server, logs: Path, repeats: int, duration: float
) -> dict[str, Figure]:
    figures = {mode: Figure(unit="/s") for mode in REG_MODES}
    for r in range(repeats):
        for mode, server in (("cluster", a), ("single", single)):
            out = loadgen(
                "cycles",
                server.url,
                logs,
                "--duration",
                str(duration),
                "--workers",
                "32",
                "--prefix",
                f"rg{r}{mode}",
            )
            figures[mode].add(out["cycles_per_s"])
            log(f"cluster registrations {mode} #{r + 1}: {out['cycles_per_s']:,.0f} cycles/s")
    return figures


def _failover(a: Server, b: Server, logs: Path, count: int) -> dict[str, Any]:
    child = Child(
        [
            "-m",
            "tests.benchmarks.loadgen",
            "failover",
            "--url",
            a.url,
            "--fallback-url",
            b.url,
            "--count",
            str(count),
            "--concurrency",
            "200",
            "--prefix",
            "failover",
        ],
        log=logs / "loadgen-failover.log",
    )
    try:
        held = child.read_json(600)
        time.sleep(2.0)  # let A commit what the registrations queued
        a.child.proc.kill()
        killed_at = time.monotonic()
        a.child.proc.wait(20)
        child.say(repr(killed_at))
        out = child.read_json(300)
        child.wait(60)
    finally:
        child.stop()
    log(
        f"cluster failover: {out['registered_again']:,} of {count:,} devices registered on the "
        f"survivor, last {out['all_s']:.1f} s after the kill ({out['attempts']:,} attempts)"
    )
    return {**out, "first_registration_per_s": held["registrations_per_s"]}
