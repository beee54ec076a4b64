"""`ccm demo-device` and `ccm demo-constellation`: the demo clients from the command line.

Without `--token` they find the key as `ccm status` does (settings, then the key file), so the
walkthrough never puts the key on a command line where `ps` shows it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from ccm.commands.options import duration, load, not_empty
from ccm.commands.output import err, out, print_json, say
from ccm.errors import CcmError

DemoUrlOpt = Annotated[
    str, typer.Option("--url", help="The server's WebSocket URL.", callback=not_empty)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="CCM_SERVER_API_KEY",
        help="The server's API key, sent as ?token= (default: $CCM_SERVER_API_KEY, the "
        "settings, then the key file in the data directory).",
        callback=not_empty,
    ),
]


def _demo_url(url: str, token: str | None) -> str:
    """The WebSocket URL with the key: given, or found as `ccm status` finds it, unless the URL
    already carries one."""
    from urllib.parse import parse_qs, urlsplit

    from ccm.api_client import client_key
    from ccm.demo import ws_url

    if token is None and "token" in parse_qs(urlsplit(url).query):
        return url
    return ws_url(url, client_key(load(None), token))


def demo_device(
    url: DemoUrlOpt = "ws://127.0.0.1:5000/ws",
    token: TokenOpt = None,
    client_id: Annotated[
        str, typer.Option("--id", help="Device id to register.", callback=not_empty)
    ] = "demo-device",
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

    from ccm.demo import DEFAULT_FEATURES, run_device
    from ccm.domain import Mode

    if mode not in {m.value for m in Mode}:
        raise CcmError(f"--mode must be 'agent' or 'relay', not {mode!r}")
    names = [f.strip() for f in (features or "").split(",") if f.strip()]
    interval = duration("--heartbeat", heartbeat).total_seconds()
    try:
        asyncio.run(
            run_device(
                _demo_url(url, token),
                client_id,
                platform=platform,
                mode=Mode(mode),
                features=names or DEFAULT_FEATURES,
                heartbeat=interval,
                max_retries=max_retries,
                on_event=lambda line: say(f"{datetime.now():%H:%M:%S} {line}"),
            )
        )
    except KeyboardInterrupt:
        say("stopped")


def demo_constellation(
    request: Annotated[
        str,
        typer.Option(help="The task: natural language or a JSON tool plan.", callback=not_empty),
    ],
    url: DemoUrlOpt = "ws://127.0.0.1:5000/ws",
    token: TokenOpt = None,
    name: Annotated[
        str,
        typer.Option(
            "--id", help="Constellation name; it connects as <id>@<target>.", callback=not_empty
        ),
    ] = "demo-constellation",
    target: Annotated[
        str, typer.Option(help="Device that runs the task.", callback=not_empty)
    ] = "demo-device",
    task_name: Annotated[str, typer.Option(help="Label of the session.")] = "demo",
    session_id: Annotated[
        str | None,
        typer.Option(help="Session id (default <id>@<8 hex digits>).", callback=not_empty),
    ] = None,
    timeout: Annotated[str, typer.Option(help="How long to wait for task_end.")] = "60s",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the task_end frame as JSON on stdout.")
    ] = False,
) -> None:
    """Send one task to a device and wait for its outcome (exit 1 unless it completed)."""
    import asyncio

    from ccm.demo import describe_task_end, run_constellation

    events = err if as_json else out
    wait = duration("--timeout", timeout).total_seconds()
    try:
        frame = asyncio.run(
            run_constellation(
                _demo_url(url, token),
                name,
                target,
                request,
                task_name=task_name,
                session_id=session_id,
                task_timeout=wait,
                on_event=lambda line: say(line, console=events),
            )
        )
    except KeyboardInterrupt:
        raise CcmError("interrupted: the server cancels the session when we leave") from None
    say(describe_task_end(frame), console=events)
    if as_json:
        print_json(frame)
    if frame.get("status") != "completed":
        raise CcmError(
            f"session {frame.get('session_id')} ended {frame.get('status')}: the error above says "
            "why, and the device's terminal shows each command it ran"
        )
