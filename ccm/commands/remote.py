"""Commands that talk to a running server over its HTTP API: `ccm status`, `ccm dispatch`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from ccm.api_client import ServerApi, client_key, server_url
from ccm.commands.options import ConfigOpt, JsonOpt, duration, load, not_empty
from ccm.commands.output import out, print_json, say, span, table
from ccm.errors import CcmError

ServerUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Server base URL (default: from the settings' host and port).",
        callback=not_empty,
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CCM_SERVER_API_KEY",
        show_envvar=False,
        help="API key (default: $CCM_SERVER_API_KEY, the settings, then the key file).",
        callback=not_empty,
    ),
]


def status(
    url: ServerUrlOpt = None,
    api_key: ApiKeyOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A one-screen summary of a running server, from its HTTP API."""
    settings = load(config)
    base = url or server_url(settings)
    with ServerApi(base, client_key(settings, api_key)) as api:
        health = api.get("/api/health")
        stats = api.get("/api/stats")
        clients = api.get("/api/clients")
    if as_json:
        print_json({"health": health, "stats": stats, "clients": clients["clients"]})
        return
    database = health.get("database") or {}
    colour = "green" if health.get("status") == "healthy" else "yellow"
    out.print(
        f"[bold]{base}[/bold]  status [{colour}]{health.get('status')}[/{colour}]  "
        f"devices {stats['device_clients']}  constellations {stats['constellation_clients']}  "
        f"live sessions {stats.get('active_sessions', 0)}  "
        f"write queue {database.get('queue_depth', 0)}",
    )
    by_state = stats.get("sessions_by_state") or {}
    if by_state:
        say("sessions in history: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())))
    table(
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


def _outcome(row: dict[str, Any]) -> list[str]:
    lines = [f"session {row['session_id']} {row['state']} on {row['device_id']}"]
    if row.get("ended_at") and row.get("created_at"):
        start = datetime.fromisoformat(row.get("started_at") or row["created_at"])
        lines[0] += (
            f" after {span((datetime.fromisoformat(row['ended_at']) - start).total_seconds())}"
        )
    if row.get("reason"):
        lines.append(f"reason: {row['reason']}")
    if row.get("error"):
        lines.append(f"error: {row['error']}")
    if row.get("result") is not None:
        lines.append("result: " + json.dumps(row["result"], ensure_ascii=False))
    return lines


def dispatch(
    device: Annotated[str, typer.Argument(help="The device that runs the task.")],
    request: Annotated[
        str,
        typer.Option(help="The task: a JSON tool plan, or natural language.", callback=not_empty),
    ],
    task_name: Annotated[
        str | None, typer.Option(help="Label of the session ([A-Za-z0-9._-]).", callback=not_empty)
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the outcome and print it.")
    ] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait waits (e.g. 5m).")] = "5m",
    url: ServerUrlOpt = None,
    api_key: ApiKeyOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send a task to a device through the running server; --wait prints how it ended."""
    settings = load(config)
    limit = duration("--timeout", timeout).total_seconds()
    with ServerApi(url or server_url(settings), client_key(settings, api_key)) as api:
        started = api.dispatch(device, request, task_name)
        session_id = started["session_id"]
        if not wait:
            if as_json:
                print_json(started)
            else:
                say(
                    f"session {session_id} dispatched to {device}; "
                    f"`ccm audit session {session_id}` shows how it ends"
                )
            return
        row = api.wait_for_end(session_id, timeout=limit)
    if as_json:
        print_json(row)
    else:
        for line in _outcome(row):
            say(line)
    if row["state"] != "completed":
        raise CcmError(f"session {session_id} ended {row['state']}: the lines above say why")
