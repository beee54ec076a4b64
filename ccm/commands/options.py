"""What every command shares: its options, reading the settings, and opening the database with
every failure turned into one line that names the URL (password masked) and what to do."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from alembic.util.exc import CommandError
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from ccm.clock import utcnow
from ccm.config import DURATION_EXAMPLES, Settings, load_settings, parse_duration
from ccm.errors import CcmError
from ccm.store import migrate
from ccm.store.engine import describe_database_error, is_sqlite, make_engine


def not_empty(value: Any) -> Any:
    """Option callback: an empty value is refused, never read as "use the default"."""
    if isinstance(value, str) and not value.strip():
        raise typer.BadParameter("is empty: give a value, or leave the option out")
    return value


ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Settings file (default: $CCM_CONFIG or config/ccm.yaml).",
        callback=not_empty,
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="SQLAlchemy URL; overrides the settings.", callback=not_empty
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="One line per row, however wide (ids are never cut).")
]


def load(config: str | None, database_url: str | None = None) -> Settings:
    """The settings, with `--database-url` over them."""
    settings = load_settings(Path(config) if config is not None else None)
    if database_url is not None:
        settings = settings.with_overrides({"database.url": database_url}, source="--database-url")
    return settings


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """Turn a failure to open, migrate or query the database into one CcmError line (the
    original stays its cause, for `--debug`)."""
    try:
        yield
    except CcmError:
        raise
    except CommandError as exc:  # alembic: a revision it cannot find or reach
        raise CcmError(f"{exc}; `ccm db current` shows the revisions") from exc
    except (SQLAlchemyError, ImportError, OSError) as exc:
        raise CcmError(describe_database_error(exc, settings.database_url)) from exc


def sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def open_engine(settings: Settings, *, create: bool = False) -> Engine:
    """An engine on a database at the migration head (call inside `database_errors`).

    SQLite is migrated on its own; without `create`, a SQLite file that does not exist is
    refused instead of created empty (a typo in the path would otherwise audit nothing)."""
    url = settings.database_url
    if not settings.database.enabled:
        raise CcmError("database.enabled is false in the settings: there is no history to read")
    file = sqlite_file(url) if is_sqlite(url) else None
    if not create and file is not None and not file.is_file():
        raise CcmError(
            f"no database at {file}: `ccm serve` creates it there; otherwise point --database-url "
            "(or database.url / data_dir) at the right file"
        )
    engine = make_engine(url, sqlite_synchronous=settings.database.sqlite_synchronous)
    try:
        migrate.ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextmanager
def opened(settings: Settings, *, create: bool = False) -> Iterator[Engine]:
    """`open_engine` for the length of a block, errors as one line, disposed at the end."""
    with database_errors(settings):
        engine = open_engine(settings, create=create)
        try:
            yield engine
        finally:
            engine.dispose()


def duration(option: str, value: str) -> timedelta:
    """A duration option (`7d`); a bare number or an empty value is a one-line error."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise CcmError(f"{option} {value!r}: {exc}") from None


def when(option: str, value: str | None) -> datetime | None:
    """An ISO 8601 time with its offset, or a duration meaning that long ago (`24h`, `7d`)."""
    if value is None:
        return None
    if not value.strip():
        raise CcmError(f"{option} is empty: give a time or a duration ago (24h, 7d)")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            return utcnow() - parse_duration(value)
        except ValueError as exc:
            if "has no unit" in str(exc):
                raise CcmError(f"{option} {value!r}: {exc} (that long ago)") from None
            raise CcmError(
                f"cannot read time {value!r} for {option}: use ISO 8601 "
                f"(2026-05-01T09:30:00+00:00) or a duration ago ({DURATION_EXAMPLES})"
            ) from None
    if parsed.tzinfo is None:
        raise CcmError(f"time {value!r} has no UTC offset; add +00:00 (or Z)")
    return parsed


try:  # typer >= 0.20 vendors click as `typer._click` and re-exports only BadParameter of its
    # errors; the base class is what every unreadable option raises. tests/test_cli.py fails
    # loudly if this stops being the class typer raises.
    from typer._click.exceptions import NoArgsIsHelpError as NoArgsIsHelpError
    from typer._click.exceptions import UsageError as UsageError
except ImportError:  # pragma: no cover - older typer drives click itself
    from click.exceptions import (  # type: ignore[assignment]
        NoArgsIsHelpError as NoArgsIsHelpError,
    )
    from click.exceptions import UsageError as UsageError  # type: ignore[assignment]


_PLAIN_WORDS = [
    (re.compile(r"Value error, "), ""),
    (
        re.compile(r"Input should be a valid integer, unable to parse string as an integer"),
        "must be a whole number",
    ),
    (re.compile(r"Input should be a valid (\w+).*"), r"must be a valid \1"),
    (re.compile(r"Input should be less than or equal to (\S+)"), r"must be at most \1"),
    (re.compile(r"Input should be greater than or equal to (\S+)"), r"must be at least \1"),
]


def usage_line(exc: UsageError) -> str:
    """A usage error as one line in plain words, with where to find the options."""
    where = exc.ctx.command_path if exc.ctx is not None else "ccm"
    message = exc.format_message().strip().replace("\n", " ")
    for pattern, words in _PLAIN_WORDS:
        message = pattern.sub(words, message)
    return f"{message} (`{where} --help` lists the options)"
