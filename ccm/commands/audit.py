"""`ccm audit`: who is online, a client's connections, sessions in a range, one session's story.

Tables show ids whole (folded onto more lines when narrow, one line with `--wide`), times in UTC,
durations, and why things ended; `--json` gives every field."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ccm.audit import read_device_loads, read_session_story
from ccm.clock import utcnow
from ccm.commands.options import ConfigOpt, JsonOpt, UrlOpt, WideOpt, load, opened, when
from ccm.commands.output import print_json, say, span, table, time_text
from ccm.domain import ClientType, SessionState
from ccm.errors import CcmError
from ccm.settings_report import mask_url
from ccm.store.repository import (
    ClientRow,
    ConnectionRow,
    SessionRow,
    read_connection_history,
    read_online_clients,
    read_sessions,
)

audit_app = typer.Typer(help="Answer audit questions from the SQL history.", no_args_is_help=True)

SinceOpt = Annotated[str | None, typer.Option(help="ISO time, or a duration ago (24h, 7d).")]
UntilOpt = Annotated[str | None, typer.Option(help="ISO time, or a duration ago (1h).")]
LimitOpt = Annotated[int, typer.Option(min=1, help="Most rows to show.")]
ERROR_CELL = 200
"""Characters of an error shown in a table cell; `audit session` and `--json` show it whole."""


def session_duration(row: SessionRow) -> str:
    start = row.started_at or row.created_at
    if row.ended_at is None:
        return f"{span((utcnow() - start).total_seconds())} so far"
    return span((row.ended_at - start).total_seconds())


def connection_duration(row: ConnectionRow) -> str:
    if row.disconnected_at is None:
        return f"{span((utcnow() - row.connected_at).total_seconds())}, open"
    return span((row.disconnected_at - row.connected_at).total_seconds())


def _cell(text: str | None) -> str | None:
    if text is None or len(text) <= ERROR_CELL:
        return text
    return text[:ERROR_CELL] + "…"


@audit_app.command("online")
def audit_online(
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Who is online now, as recorded in SQL; devices with their running and queued sessions."""
    settings = load(config, database_url)
    with opened(settings) as engine:
        rows = read_online_clients(engine)
        loads = read_device_loads(engine)
    idle = {"running": 0, "queued": 0}

    def load_of(row: ClientRow) -> dict[str, int] | None:
        if row.client_type != ClientType.DEVICE:
            return None
        return loads.get(row.client_id, idle)

    if as_json:
        print_json([row.as_dict() | (load_of(row) or {}) for row in rows])
        return
    table(
        f"{len(rows)} clients online",
        [
            "client_id",
            "type",
            "platform",
            "first seen (UTC)",
            "last seen (UTC)",
            "running",
            "queued",
        ],
        [
            [
                r.client_id,
                r.client_type,
                r.platform,
                time_text(r.first_seen_at),
                time_text(r.last_seen_at),
                *((str(x["running"]), str(x["queued"])) if (x := load_of(r)) else ("", "")),
            ]
            for r in rows
        ],
        wide=wide,
    )


@audit_app.command("connections")
def audit_connections(
    client_id: Annotated[str, typer.Argument(help="The client whose history to show.")],
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 100,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """A client's connection history, newest first: how long each lasted and why it ended."""
    settings = load(config, database_url)
    after, before = when("--since", since), when("--until", until)
    with opened(settings) as engine:
        rows = read_connection_history(engine, client_id, since=after, until=before, limit=limit)
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table(
        f"{len(rows)} connections of {client_id}",
        ["connected (UTC)", "disconnected (UTC)", "duration", "reason", "remote", "connection_id"],
        [
            [
                time_text(r.connected_at),
                time_text(r.disconnected_at) if r.disconnected_at else "open",
                connection_duration(r),
                r.disconnect_reason,
                r.remote_address,
                r.connection_id,
            ]
            for r in rows
        ],
        wide=wide,
    )


@audit_app.command("sessions")
def audit_sessions(
    device: Annotated[str | None, typer.Option(help="Sessions run by this device.")] = None,
    constellation: Annotated[
        str | None, typer.Option(help="Sessions asked for by this constellation.")
    ] = None,
    state: Annotated[
        SessionState | None, typer.Option(help="Only this state.", case_sensitive=False)
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 100,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Sessions of a device or constellation in a time range, newest first."""
    settings = load(config, database_url)
    after, before = when("--since", since), when("--until", until)
    with opened(settings) as engine:
        rows = read_sessions(
            engine,
            device_id=device,
            constellation_id=constellation,
            state=state.value if state else None,
            since=after,
            until=before,
            limit=limit,
        )
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    table(
        f"{len(rows)} sessions",
        [
            "session_id",
            "state",
            "device",
            "requested by",
            "task",
            "created (UTC)",
            "duration",
            "reason",
            "error",
        ],
        [
            [
                r.session_id,
                r.state,
                r.device_id,
                r.constellation_id or r.origin,
                r.task_name,
                time_text(r.created_at),
                session_duration(r),
                r.reason,
                _cell(r.error),
            ]
            for r in rows
        ],
        wide=wide,
    )


def _block(value: Any) -> str:
    """A request or result for reading: JSON pretty-printed, text as it is."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        return json.dumps(parsed, indent=2, ensure_ascii=False, default=str)
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _connection_line(row: ConnectionRow | None) -> str:
    if row is None:
        return "none open at the time"
    ended = (
        f"until {time_text(row.disconnected_at)} ({row.disconnect_reason})"
        if row.disconnected_at
        else "still open"
    )
    return (
        f"{row.connection_id} from {row.remote_address or '?'}, connected "
        f"{time_text(row.connected_at)}, {ended}"
    )


@audit_app.command("session")
def audit_session(
    session_id: Annotated[
        str, typer.Argument(help="A session id (its newest run) or the id of one run.")
    ],
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One session's whole story: request, device, requester, outcome, times, connections."""
    settings = load(config, database_url)
    with opened(settings) as engine:
        story = read_session_story(engine, session_id)
    if story is None:
        raise CcmError(
            f"no session {session_id!r} in {mask_url(settings.database_url)}: "
            "`ccm audit sessions` lists them"
        )
    if as_json:
        print_json(story.as_dict())
        return
    row = story.session
    requester = f"{row.constellation_id} (constellation)" if row.constellation_id else row.origin
    runs = (
        f"; {len(story.other_runs)} other run(s) of this id: {', '.join(story.other_runs)}"
        if story.other_runs
        else ""
    )
    lines = [
        f"session {row.session_id} (run {row.id}{runs})",
        f"  state       {row.state}",
        f"  reason      {row.reason or '-'}",
        f"  error       {row.error or '-'}",
        f"  device      {row.device_id} ({row.mode} mode)",
        f"  requester   {requester}",
        f"  task        {row.task_name or '-'}",
        f"  created     {time_text(row.created_at)} UTC",
        f"  started     {time_text(row.started_at)}",
        f"  ended       {time_text(row.ended_at)}",
        f"  duration    {session_duration(row)}",
        f"  device connection     {_connection_line(story.device_connection)}",
    ]
    if row.constellation_id:
        lines.append(f"  requester connection  {_connection_line(story.requester_connection)}")
    lines.append("request:")
    lines.append(_block(row.request) if row.request is not None else "-")
    lines.append("result:")
    lines.append(_block(row.result) if row.result is not None else "-")
    for line in lines:
        say(line)
