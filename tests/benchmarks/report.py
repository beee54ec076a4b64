"""Turn the results of one run into the printed table and RESULTS.md."""

from __future__ import annotations

from typing import Any

from tests.benchmarks.common import Figure, Row, fmt
from tests.benchmarks.peer_bench import PHASES

LOOKUPS = ("get_client", "is_device_connected")
KB = 1000


def _ratio(a: Figure, b: Figure) -> float:
    return a.median / b.median if b.median else float("nan")


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    reg = results.get("registry")
    if reg:
        for name, r in reg["ops"].items():
            ours, seed = r["ccm"], r["seed"]
            ratio = _ratio(ours, seed)
            value = ours.show()
            note = f"seed {seed.show()}"
            if "result_size" in r:
                note += f"; {r['result_size']:,} ids returned"
            if name in LOOKUPS:
                met = ours.median <= 1000 and ratio <= 3
                target = "≤ 1 µs and ≤ 3× dict baseline"
            elif name.startswith("select"):
                met = ours.median <= 1_000_000
                target = "≤ 1 ms at 10k devices"
            else:
                met = ratio <= 3
                target = "≤ 3× dict baseline"
            out.append(Row("1 registry", name, value, f"{ratio:.2f}× seed", target, met, note))
    relay = results.get("relay")
    if relay:
        f = relay["figures"]
        for mode, figs in f.items():
            target, met = "", None
            if mode == "sqlite":
                target, met = "≥ 12,000 tasks/s", figs["tasks_per_s"].median >= 12_000
            out.append(Row("2 relay", f"{mode}: throughput", figs["tasks_per_s"].show(), "",
                           target, met,
                           f"server CPU {figs['server_cpu_us'].show()}, "
                           f"load generator {figs['loadgen_cpu_us'].show()}"
                           + (f"; event-loop thread busy {figs['loop_busy_pct'].show()}"
                              if "loop_busy_pct" in figs else "")))
            p99_target, p99_met = "", None
            if mode == "sqlite":
                p99_target, p99_met = "p99 ≤ 15 ms", figs["p99_ms"].median <= 15
            out.append(Row("2 relay", f"{mode}: latency p50 / p99",
                           f"{figs['p50_ms'].show()} / {figs['p99_ms'].show()}", "",
                           p99_target, p99_met))
        if "memory" in f:
            for mode in ("sqlite", "postgres"):
                if mode in f:
                    ratio = _ratio(f[mode]["tasks_per_s"], f["memory"]["tasks_per_s"])
                    per_run = [a / b for a, b in zip(f[mode]["tasks_per_s"].samples,
                                                     f["memory"]["tasks_per_s"].samples,
                                                     strict=False)]
                    target, met = ("≥ 85% of in-memory", ratio >= 0.85) if mode == "sqlite" \
                        else ("", None)
                    out.append(Row("2 relay", f"{mode} / in-memory throughput", f"{ratio:.0%}",
                                   f"{ratio:.2f}", target, met,
                                   "per repeat " + ", ".join(f"{x:.0%}" for x in per_run)))
    peer = results.get("peer")
    if peer:
        ccm, seed = peer["figures"]["ccm"], peer["figures"]["seed"]
        for phase, label in PHASES.items():
            ratio = _ratio(ccm[phase], seed[phase])
            out.append(Row("3 peer", label, ccm[phase].show(), f"{ratio:.2f}× seed",
                           "≥ 1.0× seed server", ratio >= 1.0, f"seed {seed[phase].show()}"))
        out.append(Row("3 peer", "server CPU per operation (mixed)",
                       peer["server_cpu"]["ccm"].show(),
                       f"{_ratio(peer['server_cpu']['ccm'], peer['server_cpu']['seed']):.2f}× seed",
                       note=f"seed {peer['server_cpu']['seed'].show()}"))
    conns = results.get("connections")
    if conns:
        c, s = conns["ccm"], conns["seed"]
        per, per_seed = c["bytes_per_connection"], s["bytes_per_connection"]
        out.append(Row("4 connections", "memory per idle connection",
                       f"{per / KB:.1f} KB", f"{per / per_seed:.2f}× seed" if per_seed else "",
                       "≤ 40 KB", per <= 40 * KB,
                       f"RSS {c['rss_before'] / 2**20:.0f} → {c['rss_after'] / 2**20:.0f} MiB; "
                       f"seed {per_seed / KB:.1f} KB"))
        out.append(Row("4 connections", "idle connections held at once", f"{c['held']:,}",
                       "", f"{conns['count']:,} held", c["held"] >= conns["count"]
                       and c["alive_at_end"] >= conns["count"],
                       f"{c['failures']} failed; {c['alive_at_end']:,} still open at the end; "
                       f"{c.get('connection_rows', 0):,} connection rows in SQL"))
        out.append(Row("4 connections", "registrations/s (200 at a time, persisted)",
                       f"{c['registrations_per_s']:,.0f}",
                       f"{c['registrations_per_s'] / s['registrations_per_s']:.2f}× seed",
                       note=f"seed {s['registrations_per_s']:,.0f}"))
        if peer:
            cyc = peer["figures"]["ccm"]["cycles_per_s"]
            out.append(Row("4 connections", "connect/register/disconnect cycles/s (SQLite)",
                           cyc.show(), note="from (3), 32 workers, history persisted"))
    clean = results.get("cleanup")
    if clean:
        for name, r in clean.items():
            out.append(Row("5 cleanup", f"{name}: delete {r['deleted']:,} finished sessions",
                           f"{r['rows_per_s']:,.0f} rows/s", "", "≥ 100,000 rows/s",
                           r["rows_per_s"] >= 100_000,
                           f"{r['seconds']:.1f} s, batches of 5,000; {r['left']:,} left"))
            up = r["p99_during_ms"] / r["p99_before_ms"] - 1 if r["p99_before_ms"] else 0.0
            out.append(Row("5 cleanup", f"{name}: live relay p99 before → during",
                           f"{r['p99_before_ms']:.1f} → {r['p99_during_ms']:.1f} ms",
                           f"{up:+.0%}", "p99 up ≤ 20%", up <= 0.20,
                           f"at {r['relay_rate']:,.0f} tasks/s offered; p50 "
                           f"{r['p50_before_ms']:.1f} → {r['p50_during_ms']:.1f} ms; "
                           f"{r['tasks_during']:,} tasks during"))
            a = r["audit"]
            for key, label in (("connection_history_ms", "connection history of one client"),
                               ("device_day_ms", "sessions of one device in a day")):
                fig = a[key]
                out.append(Row("5 audit", f"{name}: {label} at {r['rows']:,} rows",
                               fig.show(), "", "< 20 ms", fig.median < 20,
                               f"p95 {_p(fig, 95):.2f} ms over {len(fig.samples)} queries"))
    return out


def _p(fig: Figure, q: float) -> float:
    from tests.benchmarks.common import percentile

    return percentile(fig.samples, q)


def table(results: dict[str, Any]) -> str:
    rs = rows(results)
    headers = ("section", "figure", "median (min–max)", "ratio", "target", "", "notes")
    data = [(r.section, r.name, r.value, r.ratio, r.target, r.verdict, r.note) for r in rs]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    for d in data:
        lines.append("  ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)).rstrip())
    missed = [r for r in rs if r.met is False]
    lines.append("")
    lines.append(f"targets met: {sum(1 for r in rs if r.met)}, missed: {len(missed)}; "
                 f"runtime {results.get('runtime_s', 0):.0f} s")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    rs = rows(results)
    out = ["# Benchmark results", ""]
    out.append(f"Generated by `{results['command']}` on {results['started']} "
               f"(runtime {results['runtime_s']:.0f} s). Do not edit by hand: run it again.")
    out.append("")
    out.append("## Machine")
    out.append("")
    out.append(f"- {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
               f"Python {m['python']}; open-files limit {m['nofile']:,}")
    out.append(f"- load average at start: {m['load_at_start']} (the machine is shared: other "
               "test runs compete for the two cores, so compare ratios within this run)")
    out.append("- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    out.append(f"- PostgreSQL: {results['postgres'] or 'not reachable, skipped'}")
    out.append("")
    out.append("## Results")
    out.append("")
    out.append("Each figure: median over the repeats of this run, (min–max) after it. "
               "Ratios compare medians of the same run.")
    out.append("")
    out.append("| section | figure | median (min–max) | ratio | target | met | notes |")
    out.append("|---|---|---|---|---|---|---|")
    for r in rs:
        cells = [r.section, r.name, r.value, r.ratio, r.target, r.verdict, r.note]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    missed = [r for r in rs if r.met is False]
    out.append("")
    out.append(f"Targets met: {sum(1 for r in rs if r.met)}; missed: {len(missed)}.")
    out.append("")
    out += _details(results)
    return "\n".join(out) + "\n"


def _details(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    cfg = results["config"]
    out.append("## How each figure is measured")
    out.append("")
    out.append(
        f"1. **Registry**: 10,000 devices (UFO system info, 3 platforms, features and tags "
        f"varied) and 100 constellations in ccm's `ClientConnectionManager` and in the seed's "
        f"dict-under-a-lock design (`registry_bench.SeedRegistry`, scans as the seed writes "
        f"them). Point lookups are timed over 1,010 ids per loop (10 unknown); "
        f"{cfg['registry_repeats']} repeats, ccm and seed interleaved."
    )
    out.append(
        f"2. **Relay**: three ccm servers (`database.enabled: false`, SQLite, Postgres), each "
        f"run like `ccm serve` (INFO logs to a file, uvloop, per-message deflate off); one load "
        f"generator process with 8 relay devices and 8 constellations keeping 64 sessions in "
        f"flight; {cfg['relay_repeats']} × {cfg['relay_duration']:g} s per mode after "
        f"{cfg['relay_warmup']:g} s warm-up, round-robin over modes. Latency is TASK sent → "
        f"TASK_END received at the constellation. Server CPU per task is from /proc."
    )
    out.append(
        f"3. **Peer**: ccm persisting to SQLite vs `seed_server.py` (FastAPI + the seed's "
        f"dict + lock, memory only); {cfg['peer_repeats']} × {cfg['peer_duration']:g} s per "
        f"phase and server, round-robin."
    )
    out.append(
        f"4. **Connections**: {cfg['connections']:,} UFO devices register 200 at a time and stay "
        f"idle; memory is the server's RSS growth over them (after a warm-up); ccm persists "
        f"every connection to SQLite."
    )
    out.append(
        f"5. **Cleanup and audit**: {cfg['cleanup_rows']:,} finished sessions and as many closed "
        f"connections per backend (bulk insert by the database: INSERT ... SELECT over a "
        f"series, indexes built after); audit queries through the API's own read functions "
        f"on {cfg['audit_samples']} different clients/days; cleanup = `run_cleanup` (what "
        f"`ccm cleanup --finished-before 7d` runs) in a process of its own while a ccm server "
        f"on the same database serves a live relay load at 40% of the SQLite capacity measured "
        f"in (2)."
    )
    out.append("")
    clean = results.get("cleanup")
    if clean:
        out.append("## Bulk load and query plans")
        out.append("")
        for name, r in clean.items():
            fill = r["fill"]
            out.append(f"**{name}**: inserted {r['rows']:,} sessions at "
                       f"{fill['sessions_rows_per_s']:,.0f} rows/s and {r['rows']:,} connections "
                       f"at {fill['connections_rows_per_s']:,.0f} rows/s, indexes built in "
                       f"{fill['index_build_s']:.1f} s; "
                       f"{r['audit']['rows_per_query']['day']:.0f} sessions per device-day.")
            out.append("")
            for label, plan in r["audit"]["plans"].items():
                out.append(f"{name}, {label}:")
                out.append("")
                out.append("```")
                out.append(plan)
                out.append("```")
                out.append("")
    prof = results.get("profile")
    if prof:
        if "skipped" in prof:
            out.append("## Profiles")
            out.append("")
            out.append(f"Skipped: {prof['skipped']}.")
            out.append("")
        for name, title in (("relay", "relay, 64 sessions in flight"),
                            ("peer", "peer workload (registrations, heartbeats, device info)")):
            p = prof.get(name)
            if not p:
                continue
            out.append(f"## Profile: ccm on SQLite, {title} (py-spy --gil)")
            out.append("")
            if "skipped" in p:
                out.append(f"Skipped: {p['skipped']}.")
                out.append("")
                continue
            out.append(f"{p['samples']:,} samples of the thread holding the GIL, by where the "
                       "time goes (the leaf-most matching frame decides):")
            out.append("")
            out.append("| where the time goes | share |")
            out.append("|---|---|")
            for category, share in p["categories"]:
                out.append(f"| {category} | {share:.0%} |")
            out.append("")
            out.append("Top functions by own samples: " + "; ".join(
                f"{fn} {share:.1%}" for fn, share in p["self"][:10]) + ".")
            out.append("")
    out.append(LIMITS)
    return out


LIMITS = """## What limits the missed targets

The table's figures are this run's. Ranges quoted below span the full runs made while building
this suite on the same shared machine (load average 1.5 to 3 on its two cores); the per-thread
and per-commit figures were measured then too.

- **Relay throughput (12,000 tasks/s) and p99 (15 ms at 64 in flight).** The bound is CPython
  work per frame on one event loop. A task is two frames in and four out, each through Starlette,
  uvicorn's websockets-sansio protocol and asyncio; the relay profile above spreads the time over
  frame receive/parse, frame build, send, asyncio machinery, logging (two INFO lines per session)
  and ccm's own logic, none dominant. In memory ccm spends 500 to 670 µs of CPU per task, so one
  core gives 1,500 to 2,000 tasks/s; 12,000 would need about 80 µs. The load generator, also
  Python, needs about 200 µs per task: at 12,000 tasks/s it alone would need more than the
  machine's two cores, so the target cannot even be offered here. With 64 sessions in flight the
  latency is 64 / throughput, so p99 ≤ 15 ms needs roughly 5,000 tasks/s.
- **SQLite at ≥ 85% of in-memory (53% to 59% in the full runs).** Persistence roughly doubles the
  server's CPU per task (server CPU column). Split per thread with /proc at about 650 tasks/s:
  the store writer thread used about 430 µs per task and the event-loop thread about 270 µs more
  than in memory. The writer shares the GIL with the event loop and every sqlite3 call releases
  and takes it again; a SQLite commit costs about 0.45 ms here (WAL frames for the table and its
  indexes), and with 64 sessions in flight a batch holds only 6 to 10 writes, so commits are
  frequent. Group commit is in place (one transaction per batch, one event-loop wake-up per batch
  for all its waiters); a commit delay of 1 to 10 ms to grow the batches was tried and gave no
  measurable gain at this load, so it was left out. Beating this needs the writer out of the
  server's process (or a C-level batch API), not more Python tuning.
- **Peer ratio (≥ 1.0× the seed server; 0.3× to 1.05× per phase in the full runs).** ccm's server
  CPU per operation is 1.6 to 2.3 times the seed's (row above). The peer profile shows where:
  asyncio tasks and queues (an `asyncio.wait_for` task per received frame and per sent frame, and
  the switch to each peer's sender task), frame parsing (pydantic plus the NUL/surrogate guard),
  frame building and the outbox. These buy the slow-consumer protection, identity checks,
  persisted registrations and metrics that the seed server lacks. Replacing both `wait_for` calls
  with `asyncio.timeout` cut relay CPU per task by about 8% and raised heartbeats/s by about 10%
  in a trial, but it changes the scheduling that the protocol-error close relies on (the queued
  ERROR frames were dropped before the close), so it waits for a fix in the ordering of
  `Peer.kick` and `Hub.disconnect`.
- **Memory per idle connection (≤ 40 KB; about 44 KB).** The seed server, with nothing of ccm's,
  already takes about 37 KB per connection (uvicorn's protocol object, the Starlette/FastAPI
  middleware frames and exit stack of each connection). ccm adds its peer outbox (an
  `asyncio.Queue`: three deques and an event, about 3 KB by tracemalloc), the sender task and the
  receive-timeout task. Removed while building this suite: two extra copies of each device's
  system info, the REGISTER frame kept alive for the life of the connection, and the decoded
  headers kept by the loopback guard (48.6 KB → about 44 KB). A lazily started sender (no task
  and no queue while a connection is idle) would save most of the rest.
- **Cleanup on SQLite (≥ 100,000 rows/s, p99 up ≤ 20%).** Deleting a session removes it from the
  table and each of its indexes; SQLite does that at about 27,000 rows/s here. SQLite has one
  write lock and a waiting writer only polls for it, backing off to 100 ms: a cleanup process
  that took the lock again right after each commit starved the server's writer, and the relay
  p99 went from 27 ms to 2 s. `run_cleanup` now rests between batches on SQLite as long as each
  batch took, which lets the server commit in between (about 12,000 rows/s, p99 about 0.4 s).
  For SQLite deployments: run cleanup off-peak, or with a smaller `--batch-size`.
- **Cleanup on PostgreSQL.** Row locks and MVCC deletes: the server's writes never wait on the
  cleanup. The deletion rate was 83,000 to 119,000 rows/s over the runs and the relay p99 moved
  by −26% to +1,370%: the postgres backend deleting takes most of a core, and on two shared cores
  that CPU comes out of the relay server and the load generator, so the p99 follows the
  machine's other load rather than any lock.
"""


__all__ = ["fmt", "markdown", "rows", "table"]
