"""The `ccm` command: parse options, load settings once, call one function, print the outcome.

Errors print one line saying what to do next and exit with status 1.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Engine

from ccm.clock import utcnow
from ccm.config import Settings, load_settings, parse_duration
from ccm.errors import CcmError
from ccm.store import migrate
from ccm.store.engine import make_engine

app = typer.Typer(
    name="ccm",
    help="Client Connection Manager: live registry and SQL history for AIP clients.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Schema migrations (Alembic).", no_args_is_help=True)
audit_app = typer.Typer(help="Answer audit questions from the SQL history.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")

out = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: $CCM_CONFIG or config/ccm.yaml)."),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="SQLAlchemy URL; overrides the settings."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _settings(config: Path | None, database_url: str | None = None) -> Settings:
    settings = load_settings(config)
    if database_url:
        settings = settings.with_overrides({"database.url": database_url})
    return settings


def _engine(settings: Settings) -> Engine:
    engine = make_engine(
        settings.database_url, sqlite_synchronous=settings.database.sqlite_synchronous
    )
    migrate.ensure_schema(engine)
    return engine


def _duration(option: str, value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError:
        raise CcmError(
            f"cannot read {option} {value!r}: use a duration like 30m, 24h, 7d"
        ) from None


def _when(value: str | None) -> datetime | None:
    """An ISO 8601 time, or a duration meaning that long ago (`24h`, `7d`)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            return utcnow() - parse_duration(value)
        except ValueError:
            raise CcmError(
                f"cannot read time {value!r}: use ISO 8601 (2026-05-01T09:30:00+00:00) "
                "or a duration ago (24h, 7d)"
            ) from None
    if parsed.tzinfo is None:
        raise CcmError(f"time {value!r} has no UTC offset; add +00:00 (or Z)")
    return parsed


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


# -- serve -------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 5000).")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key for clients (default: settings or generated).")
    ] = None,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR (default: settings).")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="text or json (default: settings).")
    ] = None,
) -> None:
    """Run the server: AIP WebSocket at /ws, HTTP API at /api, OpenAPI docs at /docs."""
    from ccm.devices import DeviceConfigs
    from ccm.logs import configure_logging
    from ccm.server.app import create_app
    from ccm.server.auth import API_KEY_FILE, resolve_api_key
    from ccm.server.serve import run_server

    settings = _settings(config, database_url).with_overrides(
        {
            "server.host": host,
            "server.port": port,
            "server.api_key": api_key,
            "logging.level": log_level,
            "logging.format": log_format,
        }
    )
    configure_logging(settings.logging.level, settings.logging.format)
    DeviceConfigs(settings.device_config)  # a missing or malformed file: one clear line, no trace
    if settings.database.enabled:
        from ccm.store.exclusive import hold_sqlite_file

        hold_sqlite_file(settings.database_url)  # a second server on one SQLite file: refused
        _engine(settings).dispose()  # SQLite: migrated now; Postgres: refuse an outdated schema
    key, generated = resolve_api_key(settings)
    where = settings.data_dir / API_KEY_FILE
    base = f"{settings.server.host}:{settings.server.port}"
    if generated:
        err.print(
            f"[bold]Generated an API key[/bold] (stored in {where}, mode 0600; shown only now):\n"
            f"  {key}\n"
            f"  WebSocket clients: ws://{base}/ws?token=<key>\n"
            f"  HTTP API:          curl -H 'X-API-Key: <key>' http://{base}/api/health",
            highlight=False,
        )
    elif not settings.server.api_key:
        err.print(f"API key: read from {where}", highlight=False)
    run_server(create_app(settings, api_key=key), settings)


# -- db ----------------------------------------------------------------------------------------


def _current_revision(settings: Settings) -> str | None:
    engine = make_engine(settings.database_url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def _revision_report(settings: Settings, as_json: bool) -> None:
    current = _current_revision(settings)
    if as_json:
        _print_json({"current": current, "head": migrate.head_revision()})
    else:
        out.print(f"database at {current or '(empty)'}")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply migrations up to REVISION (default: head)."""
    settings = _settings(config, database_url)
    migrate.upgrade(settings.database_url, revision)
    _revision_report(settings, as_json)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision (e.g. base).")],
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revert migrations down to REVISION."""
    settings = _settings(config, database_url)
    migrate.downgrade(settings.database_url, revision)
    _revision_report(settings, as_json)


@db_app.command("current")
def db_current(
    config: ConfigOpt = None, database_url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Show the database's revision and the code's head."""
    settings = _settings(config, database_url)
    current = _current_revision(settings)
    head = migrate.head_revision()
    if as_json:
        _print_json({"current": current, "head": head, "up_to_date": current == head})
        return
    state = "up to date" if current == head else "OUTDATED: run `ccm db upgrade`"
    out.print(f"current {current or '(empty)'}  head {head}  {state}")


@db_app.command("check")
def db_check(
    config: ConfigOpt = None, database_url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Fail if the database is not at head or the models differ from the migrations."""
    settings = _settings(config, database_url)
    current, head = _current_revision(settings), migrate.head_revision()
    if current != head:
        raise CcmError(
            f"database is at {current or '(empty)'}, head is {head}: run `ccm db upgrade`"
        )
    migrate.check(settings.database_url)
    if as_json:
        _print_json({"current": current, "head": head, "matches_models": True})
        return
    out.print("schema matches the models")


# -- cleanup -----------------------------------------------------------------------------------


@app.command()
def cleanup(
    finished_before: Annotated[
        str | None,
        typer.Option(help="Delete sessions that finished longer ago than this (e.g. 7d)."),
    ] = None,
    connections_before: Annotated[
        str | None,
        typer.Option(help="Delete closed connections older than this (default: settings)."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per transaction.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would go.")] = False,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete finished sessions and old connection rows, in batches; safe while the server runs."""
    from ccm.maintenance import plan_cleanup, run_cleanup

    settings = _settings(config, database_url)
    engine = _engine(settings)
    now = utcnow()
    sessions_cut = now - (
        _duration("--finished-before", finished_before)
        if finished_before
        else settings.cleanup.finished_before
    )
    connections_cut = now - (
        _duration("--connections-before", connections_before)
        if connections_before
        else settings.cleanup.connections_retention
    )
    size = batch_size or settings.cleanup.batch_size
    if dry_run or as_json:
        report = run_cleanup(
            engine,
            sessions_before=sessions_cut,
            connections_before=connections_cut,
            batch_size=size,
            dry_run=dry_run,
        )
    else:
        plan = plan_cleanup(
            engine, sessions_before=sessions_cut, connections_before=connections_cut
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            tasks = {
                "sessions": bar.add_task("sessions", total=plan.sessions),
                "connections": bar.add_task("connections", total=plan.connections),
            }
            report = run_cleanup(
                engine,
                sessions_before=sessions_cut,
                connections_before=connections_cut,
                batch_size=size,
                progress=lambda table, n: bar.advance(tasks[table], n),
            )
    if as_json:
        _print_json(
            {
                "dry_run": report.dry_run,
                "sessions": report.sessions_deleted,
                "connections": report.connections_deleted,
                "sessions_finished_before": sessions_cut.isoformat(),
                "connections_closed_before": connections_cut.isoformat(),
            }
        )
        return
    verb = "would delete" if report.dry_run else "deleted"
    out.print(
        f"{verb} {report.sessions_deleted} sessions finished before {sessions_cut:%Y-%m-%d %H:%M} "
        f"UTC and {report.connections_deleted} connections closed before "
        f"{connections_cut:%Y-%m-%d %H:%M} UTC"
    )


# -- audit -------------------------------------------------------------------------------------


@audit_app.command("online")
def audit_online(
    config: ConfigOpt = None, database_url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Who is online now (as recorded in SQL)."""
    from ccm.store.repository import read_online_clients

    rows = read_online_clients(_engine(_settings(config, database_url)))
    if as_json:
        _print_json([row.as_dict() for row in rows])
        return
    _table(
        f"{len(rows)} clients online",
        ["client_id", "type", "platform", "first seen", "last seen"],
        [[r.client_id, r.client_type, r.platform, r.first_seen_at, r.last_seen_at] for r in rows],
    )


@audit_app.command("connections")
def audit_connections(
    client_id: Annotated[str, typer.Argument(help="The client whose history to show.")],
    since: Annotated[str | None, typer.Option(help="ISO time or duration ago (24h).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time or duration ago.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A client's connection history, newest first."""
    from ccm.store.repository import read_connection_history

    rows = read_connection_history(
        _engine(_settings(config, database_url)),
        client_id,
        since=_when(since),
        until=_when(until),
        limit=limit,
    )
    if as_json:
        _print_json([row.as_dict() for row in rows])
        return
    _table(
        f"connections of {client_id}",
        ["connected", "disconnected", "reason", "remote", "connection_id"],
        [
            [
                r.connected_at,
                r.disconnected_at,
                r.disconnect_reason,
                r.remote_address,
                r.connection_id,
            ]
            for r in rows
        ],
    )


@audit_app.command("sessions")
def audit_sessions(
    device: Annotated[str | None, typer.Option(help="Sessions run by this device.")] = None,
    constellation: Annotated[
        str | None, typer.Option(help="Sessions asked for by this constellation.")
    ] = None,
    state: Annotated[str | None, typer.Option(help="Only this state.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time or duration ago (24h).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time or duration ago.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sessions of a device or constellation in a time range, newest first."""
    from ccm.store.repository import read_sessions

    rows = read_sessions(
        _engine(_settings(config, database_url)),
        device_id=device,
        constellation_id=constellation,
        state=state,
        since=_when(since),
        until=_when(until),
        limit=limit,
    )
    if as_json:
        _print_json([row.as_dict() for row in rows])
        return
    _table(
        f"{len(rows)} sessions",
        ["session_id", "state", "device", "constellation", "task", "created", "ended", "reason"],
        [
            [
                r.session_id,
                r.state,
                r.device_id,
                r.constellation_id,
                r.task_name,
                r.created_at,
                r.ended_at,
                r.reason or r.error,
            ]
            for r in rows
        ],
    )


# -- status ------------------------------------------------------------------------------------


@app.command()
def status(
    url: Annotated[
        str | None, typer.Option(help="Server base URL (default: from settings host/port).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: settings, then <data_dir>/api_key).")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A one-screen summary of a running server, from its HTTP API."""
    import httpx

    from ccm.server.auth import API_KEY_FILE

    settings = _settings(config)
    base = url or f"http://{settings.server.host}:{settings.server.port}"
    key = api_key or settings.server.api_key
    key_file = settings.data_dir / API_KEY_FILE
    if key is None and key_file.is_file():
        key = key_file.read_text(encoding="utf-8").strip()
    if not key:
        raise CcmError(f"no API key: pass --api-key, set CCM_SERVER_API_KEY, or create {key_file}")
    try:
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=10) as http:
            answers = {name: http.get(f"/api/{name}") for name in ("health", "stats", "clients")}
    except httpx.HTTPError as exc:
        raise CcmError(f"cannot reach {base}: {exc}; is `ccm serve` running there?") from None
    for name, answer in answers.items():
        if answer.status_code == 401:
            raise CcmError(f"{base} refused the API key (401); check --api-key or {key_file}")
        if answer.status_code != 200:
            raise CcmError(f"{base}/api/{name} answered {answer.status_code}: {answer.text[:200]}")
    health, stats, clients = (answers[n].json() for n in ("health", "stats", "clients"))
    if as_json:
        _print_json({"health": health, "stats": stats, "clients": clients["clients"]})
        return
    database = health.get("database", {})
    colour = "green" if health.get("status") == "healthy" else "yellow"
    out.print(
        f"[bold]{base}[/bold]  status [{colour}]{health.get('status')}[/{colour}]  "
        f"devices {stats['device_clients']}  constellations {stats['constellation_clients']}  "
        f"live sessions {stats.get('active_sessions', 0)}  "
        f"write queue {database.get('queue_depth', 0)}",
        highlight=False,
    )
    by_state = stats.get("sessions_by_state") or {}
    if by_state:
        out.print(
            "sessions in history: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())),
            highlight=False,
        )
    _table(
        "connected clients",
        ["client_id", "type", "platform", "connected", "last heartbeat"],
        [
            [
                c["client_id"],
                c["client_type"],
                c["platform"],
                c["connected_at"],
                c["last_heartbeat_at"],
            ]
            for c in clients["clients"]
        ],
    )


# -- demo clients ------------------------------------------------------------------------------

DemoUrlOpt = Annotated[str, typer.Option("--url", help="The server's WebSocket URL.")]


def _say(console: Console, line: str) -> None:
    """A demo client's progress line, printed as is (it may hold JSON with brackets)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="CCM_SERVER_API_KEY", help="The server's API key (sent as ?token=)."
    ),
]


@app.command("demo-device")
def demo_device(
    url: DemoUrlOpt = "ws://127.0.0.1:5000/ws",
    token: TokenOpt = None,
    client_id: Annotated[str, typer.Option("--id", help="Device id to register.")] = "demo-device",
    platform: Annotated[str, typer.Option(help="Platform reported at registration.")] = "linux",
    mode: Annotated[
        str, typer.Option(help="agent: ccm sends tool calls; relay: this device runs the task.")
    ] = "agent",
    features: Annotated[
        str | None, typer.Option(help="Comma-separated supported_features to report.")
    ] = None,
    heartbeat: Annotated[str, typer.Option(help="Heartbeat interval (e.g. 30s).")] = "30s",
    max_retries: Annotated[int, typer.Option(min=0, help="Reconnection attempts.")] = 5,
) -> None:
    """Run a demo device with the tools list_tools, echo, add, sleep and fail, until Ctrl-C."""
    import asyncio

    from ccm.demo import DEFAULT_FEATURES, run_device, ws_url
    from ccm.domain import Mode

    if mode not in {m.value for m in Mode}:
        raise CcmError(f"--mode must be 'agent' or 'relay', got {mode!r}")
    names = [f.strip() for f in (features or "").split(",") if f.strip()]
    try:
        asyncio.run(
            run_device(
                ws_url(url, token),
                client_id,
                platform=platform,
                mode=Mode(mode),
                features=names or DEFAULT_FEATURES,
                heartbeat=_duration("--heartbeat", heartbeat).total_seconds(),
                max_retries=max_retries,
                on_event=lambda line: _say(out, f"{datetime.now():%H:%M:%S} {line}"),
            )
        )
    except KeyboardInterrupt:
        out.print("stopped", highlight=False)


@app.command("demo-constellation")
def demo_constellation(
    request: Annotated[str, typer.Option(help="The task: natural language or a JSON tool plan.")],
    url: DemoUrlOpt = "ws://127.0.0.1:5000/ws",
    token: TokenOpt = None,
    name: Annotated[
        str, typer.Option("--id", help="Constellation name; it connects as <id>@<target>.")
    ] = "demo-constellation",
    target: Annotated[str, typer.Option(help="Device that runs the task.")] = "demo-device",
    task_name: Annotated[str, typer.Option(help="Label of the session.")] = "demo",
    session_id: Annotated[
        str | None, typer.Option(help="Session id (default <id>@<8 hex digits>).")
    ] = None,
    timeout: Annotated[str, typer.Option(help="How long to wait for task_end.")] = "60s",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the task_end frame as JSON on stdout.")
    ] = False,
) -> None:
    """Send one task to a device through the server and wait for its outcome (exit 1 unless
    it completed)."""
    import asyncio

    from ccm.demo import describe_task_end, run_constellation, ws_url

    events = err if as_json else out
    try:
        frame = asyncio.run(
            run_constellation(
                ws_url(url, token),
                name,
                target,
                request,
                task_name=task_name,
                session_id=session_id,
                task_timeout=_duration("--timeout", timeout).total_seconds(),
                on_event=lambda line: _say(events, line),
            )
        )
    except KeyboardInterrupt:
        raise CcmError("interrupted: the server cancels the session when we leave") from None
    _say(events, describe_task_end(frame))
    if as_json:
        _print_json(frame)
    if frame.get("status") != "completed":
        raise CcmError(
            f"session {frame.get('session_id')} ended {frame.get('status')}: the error above says "
            "why, and the device's terminal shows each command it ran"
        )


def main() -> None:
    """Entry point of the `ccm` script: CcmError becomes one line on stderr and exit 1."""
    try:
        app()
    except CcmError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(1) from None
