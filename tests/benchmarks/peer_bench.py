"""(3) Peer: registrations, heartbeats and device info against ccm (persisting to SQLite) and the
seed's in-memory server (seed_server.py), same load generator, round-robin over the repeats.

Workload per run, each phase closed-loop for `duration` seconds after a short warm-up:
- cycles: 32 workers connect, REGISTER as a UFO device, await the confirmation, close;
- heartbeats: 64 registered devices send HEARTBEAT and await the ack;
- device info: 64 constellations (each scoped to one device) request its info and await it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.benchmarks.common import Figure, Server, loadgen, log, start_ccm, start_seed

PHASES = {
    "cycles_per_s": "connect/register/close cycles/s",
    "heartbeats_per_s": "heartbeats/s",
    "device_infos_per_s": "device-info replies/s",
}


def run(*, logs: Path, sqlite_url: str, repeats: int, duration: float) -> dict[str, Any]:
    servers: dict[str, Server] = {}
    try:
        servers["ccm"] = start_ccm("peer-ccm", logs, database_url=sqlite_url)
        servers["seed"] = start_seed(logs)
        figures = {name: {phase: Figure(unit="/s") for phase in PHASES} for name in servers}
        cpu = {name: Figure(unit="µs/op") for name in servers}
        for r in range(repeats):
            for name, server in servers.items():
                cpu0 = server.cpu()
                out = loadgen(
                    "peer", server.url, logs, "--duration", str(duration), "--prefix", f"p{r}{name}"
                )
                ops = out["cycles"] + out["heartbeats"] + out["device_infos"]
                cpu[name].add((server.cpu() - cpu0) / max(ops, 1) * 1e6)
                for phase in PHASES:
                    figures[name][phase].add(out[phase])
                log(
                    f"peer {name} #{r + 1}: "
                    + ", ".join(f"{out[p]:,.0f} {label}" for p, label in PHASES.items())
                )
        return {"figures": figures, "server_cpu": cpu}
    finally:
        for server in servers.values():
            server.stop()
