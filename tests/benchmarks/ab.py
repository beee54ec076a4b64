"""A/B of ccm trees, interleaved: did a change make the server slower?

    git worktree add --detach /tmp/before <commit>
    .venv/bin/python -m tests.benchmarks.ab --rounds 3 before=/tmp/before after=.

Each tree's server runs like `ccm serve` (tests.benchmarks.server_proc of that tree, imported
from it through PYTHONPATH), one after the other in every round, so a busy machine weighs on
all of them alike. Per tree and round: server CPU per connect/register/close cycle and per relay
task in memory, and per cycle persisted to SQLite with its rate. Prints each round, then the
medians as JSON. Compare CPU per operation: rates move more with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tests.benchmarks.common import Child, Server, free_port, loadgen, log, wait_for_port

FIGURES = ("cycle_us", "task_us", "sqlite_cycle_us", "sqlite_cycles_per_s")


def _start(name: str, tree: Path, logs: Path, database_url: str | None) -> Server:
    port = free_port()
    where = ["--database-url", database_url] if database_url else ["--memory"]
    child = Child(
        ["-m", "tests.benchmarks.server_proc", "--port", str(port), *where],
        log=logs / f"ab-{name}.log",
        env={"PYTHONPATH": str(tree.resolve())},
    )
    wait_for_port(port, child)
    return Server(name, child, port)


def _cpu_per(server: Server, logs: Path, mode: str, count_key: str, prefix: str) -> float:
    before = server.cpu()
    out = loadgen(mode, server.url, logs, "--duration", "5", "--prefix", prefix)
    return (server.cpu() - before) / max(out[count_key], 1) * 1e6


def measure(trees: dict[str, Path], rounds: int, logs: Path) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, list[float]]] = {n: {f: [] for f in FIGURES} for n in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            server = _start(name, tree, logs, None)
            try:
                loadgen("cycles", server.url, logs, "--duration", "1.5", "--prefix", f"w{r}")
                found[name]["cycle_us"].append(
                    _cpu_per(server, logs, "cycles", "cycles", f"c{r}{name}")
                )
                found[name]["task_us"].append(
                    _cpu_per(server, logs, "relay", "total_tasks", f"r{r}{name}")
                )
            finally:
                server.stop()
            url = f"sqlite:///{logs / f'ab-{name}-{r}.db'}"
            server = _start(name, tree, logs, url)
            try:
                loadgen("cycles", server.url, logs, "--duration", "1.5", "--prefix", f"sw{r}")
                before = server.cpu()
                out = loadgen("cycles", server.url, logs, "--duration", "5", "--prefix", f"s{r}")
                found[name]["sqlite_cycle_us"].append(
                    (server.cpu() - before) / max(out["cycles"], 1) * 1e6
                )
                found[name]["sqlite_cycles_per_s"].append(out["cycles_per_s"])
            finally:
                server.stop()
            figures = ", ".join(f"{f} {found[name][f][-1]:,.0f}" for f in FIGURES)
            log(f"round {r + 1} {name}: {figures}")
    return {n: {f: statistics.median(v) for f, v in figs.items()} for n, figs in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("trees", nargs="+", help="name=path of a checkout of ccm")
    args = parser.parse_args()
    trees = {}
    for item in args.trees:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "ccm").is_dir():
            parser.error(f"{item!r}: give name=path, the path a checkout of ccm (with ccm/ in it)")
        trees[name] = Path(path)
    with tempfile.TemporaryDirectory(prefix="ccm-ab-") as tmp:
        medians = measure(trees, args.rounds, Path(tmp))
    print(json.dumps({n: {f: round(v, 1) for f, v in m.items()} for n, m in medians.items()}))


if __name__ == "__main__":
    main()
