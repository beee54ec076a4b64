"""The `ccm` command: parse options, load settings once, call one function, print the outcome.

Every error is one line on stderr that says what to do next, with exit status 1 (2 for an option
the command cannot read); `--debug` (or `-v`), anywhere on the command line, adds the traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ccm import __version__
from ccm.clock import utcnow
from ccm.commands.audit import audit_app
from ccm.commands.config_check import config_app
from ccm.commands.db import db_app
from ccm.commands.demo import demo_constellation, demo_device
from ccm.commands.keys import key_app
from ccm.commands.options import (
    ConfigOpt,
    JsonOpt,
    NoArgsIsHelpError,
    UrlOpt,
    UsageError,
    database_errors,
    duration,
    load,
    not_empty,
    opened,
    usage_line,
)
from ccm.commands.output import err, print_json, say
from ccm.commands.ports import METRICS_PORT, SERVER_PORT, check_port
from ccm.commands.remote import dispatch, status
from ccm.config import LogFormat, LogLevel
from ccm.errors import CcmError

app = typer.Typer(
    name="ccm",
    help="Client Connection Manager: live registry and SQL history for AIP clients.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
DEBUG_FLAGS = ("--debug", "-v")


def _print_version(value: bool) -> None:
    if value:
        say(f"ccm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", "-v", help="Show the traceback of an error (also after the command)."
        ),
    ] = False,
) -> None:
    """Client Connection Manager: live registry and SQL history for AIP clients."""


# -- serve -------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default 127.0.0.1).", callback=not_empty)
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default 5000).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="API key for clients (default: settings or the key file); visible in `ps`, "
            "prefer CCM_SERVER_API_KEY.",
            callback=not_empty,
        ),
    ] = None,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
    log_level: Annotated[
        LogLevel | None, typer.Option(help="Default: the settings.", case_sensitive=False)
    ] = None,
    log_format: Annotated[
        LogFormat | None, typer.Option(help="Default: the settings.", case_sensitive=False)
    ] = None,
) -> None:
    """Run the server: AIP WebSocket at /ws, HTTP API at /api, the dashboard at /dashboard."""
    from ccm.devices import DeviceConfigs
    from ccm.logs import configure_logging
    from ccm.server.app import create_app
    from ccm.server.auth import (
        API_KEY_FILE,
        configured_keys,
        fingerprint,
        key_ring,
        read_key_file,
        resolve_api_key,
    )
    from ccm.server.serve import run_server

    settings = load(config, database_url).with_overrides(
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
    check_port(settings.server.host, settings.server.port, SERVER_PORT)
    if settings.metrics.enabled and settings.metrics.port is not None:
        check_port(settings.metrics.host, settings.metrics.port, METRICS_PORT)
    if settings.database.enabled:
        from ccm.store.exclusive import hold_sqlite_file

        with database_errors(settings):
            hold_sqlite_file(settings.database_url)  # a second server on one SQLite file: refused
        with opened(settings, create=True):
            pass  # SQLite: migrated now; Postgres: refuse an outdated schema
    key, generated = resolve_api_key(settings)
    where = settings.data_dir / API_KEY_FILE
    base = f"{settings.server.host}:{settings.server.port}"
    if generated:
        err.print(
            f"[bold]Generated an API key[/bold] (stored in {where}, mode 0600; shown only now):\n"
            f"  {key}\n"
            f"  WebSocket clients: ws://{base}/ws?token=<key>\n"
            f"  HTTP API:          curl -H 'X-API-Key: <key>' http://{base}/api/health",
        )
    elif configured_keys(settings):
        prints = ", ".join(fingerprint(k) for k in configured_keys(settings))
        say(f"API keys {prints} from the settings", console=err)
    else:
        prints = ", ".join(fingerprint(k) for k in read_key_file(where))
        say(f"API keys {prints} read from {where} (`ccm key` adds and revokes)", console=err)
    run_server(create_app(settings, api_key=key_ring(settings)), settings)


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

    settings = load(config, database_url)
    now = utcnow()
    sessions_cut = now - (
        duration("--finished-before", finished_before)
        if finished_before is not None
        else settings.cleanup.finished_before
    )
    connections_cut = now - (
        duration("--connections-before", connections_before)
        if connections_before is not None
        else settings.cleanup.connections_retention
    )
    size = batch_size or settings.cleanup.batch_size
    with opened(settings) as engine:
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
        print_json(
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
    say(
        f"{verb} {report.sessions_deleted} sessions finished before {sessions_cut:%Y-%m-%d %H:%M} "
        f"UTC and {report.connections_deleted} connections closed before "
        f"{connections_cut:%Y-%m-%d %H:%M} UTC"
    )


# -- the rest, in the order `ccm --help` lists them ------------------------------------------

app.command()(status)
app.command()(dispatch)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(key_app, name="key")
app.command("demo-device")(demo_device)
app.command("demo-constellation")(demo_constellation)


# -- the entry point ---------------------------------------------------------------------------


def _split_debug(args: list[str]) -> tuple[list[str], bool]:
    """`--debug` / `-v` may stand anywhere before a `--`; take them out for the root option."""
    end = args.index("--") if "--" in args else len(args)
    debug = any(a in DEBUG_FLAGS for a in args[:end])
    return [a for a in args[:end] if a not in DEBUG_FLAGS] + args[end:], debug


def _fail(line: str, exc: BaseException, debug: bool, code: int) -> None:
    if debug:
        traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
    err.print(Text("error: ", style="red") + Text(line))
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ccm` script: every error one line on stderr (exit 1; 2 for an option
    that cannot be read), its traceback only with `--debug` / `-v`."""
    args, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=args, prog_name="ccm", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        say(exc.format_message())
        raise SystemExit(2) from None
    except UsageError as exc:
        _fail(usage_line(exc), exc, debug, 2)
    except typer.Abort as exc:
        _fail("aborted", exc, debug, 1)
    except CcmError as exc:
        _fail(str(exc), exc, debug, 1)
    if isinstance(code, int) and code:
        raise SystemExit(code)
