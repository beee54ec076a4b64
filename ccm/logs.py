"""Logging: one logger per module, ids bound per task with contextvars, text or JSON lines.

`bind(client_id=..., session_id=...)` adds fields to every record logged afterwards in the same
task (and in tasks it starts, which copy the context), the way structlog's contextvars do, so
handlers need not repeat ids. `configure_logging()` is called once by the CLI, never at import.
API keys never reach the output: the WebSocket token is redacted from every line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ccm_log_context", default=None
)


def bind(**fields: Any) -> None:
    """Add fields to the log context of the current task (and of tasks it starts later)."""
    _context.set({**(_context.get() or {}), **fields})


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Fields bound for the duration of a block."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record as `record.ctx`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = current_context()
        return True


def _one_line(text: str) -> str:
    """Client-chosen text (ids, error texts) must not start a new, forged log line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The stdlib's default form (`2026-11-30 01:02:03,456`), with strftime run once per
        second instead of once per line (it showed in the relay profile)."""
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _one_line(super().formatMessage(record))  # the traceback is added after this

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            line += " " + " ".join(
                f"{k}={_one_line(str(v))}" for k, v in ctx.items() if f"{k}=" not in line
            )
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, bound ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "ctx", None) or {})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+")


def redact(text: str) -> str:
    """Remove `token=` values from a log line (the WebSocket key travels in the URL)."""
    if "token=" not in text:  # every log record passes here: skip the regex when it cannot match
        return text
    return _TOKEN_IN_TEXT.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Logging filter that keeps API keys out of access and error logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


class HandledClientErrors(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 text frame as an ERROR with a traceback, although it
    handles it (close 1007). Bad input we handled is a WARNING without a traceback here, so an
    ERROR in the log always means something the server could not handle."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid UTF-8 sequence"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "invalid UTF-8 in a text frame; connection closed with 1007",
                (),
            )
            record.exc_info = record.exc_text = None
        return True


class ConnectionChatter(logging.Filter):
    """Drops uvicorn's three INFO lines per WebSocket (`[accepted]`, `connection open`,
    `connection closed`): ccm logs `client registered` (with the remote address) and `client
    removed` (with the reason) for each connection, and at thousands of connections a minute
    the duplicates cost a tenth of the server's time (the connect/register/close profile in
    tests/benchmarks). They are kept when the log level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        msg = record.msg
        return not (
            msg == "connection open"
            or msg == "connection closed"
            or (isinstance(msg, str) and msg.endswith('" [accepted]'))
        )


def protect_uvicorn_loggers(level: int | str = logging.INFO) -> None:
    """Filters on uvicorn's own loggers, so they hold for every handler (a handler filter, as in
    configure_logging, protects only that handler): tokens redacted, handled client errors
    downgraded, and the per-WebSocket chatter dropped unless the level is DEBUG. Idempotent."""
    for name in ("uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in log.filters):
            log.addFilter(RedactTokens())
    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HandledClientErrors) for f in error_log.filters):
        error_log.addFilter(HandledClientErrors())
    chatter = [f for f in error_log.filters if isinstance(f, ConnectionChatter)]
    debug = logging.getLevelName(level) if isinstance(level, str) else level
    if isinstance(debug, int) and debug <= logging.DEBUG:
        for f in chatter:
            error_log.removeFilter(f)
    elif not chatter:
        error_log.filters.insert(0, ConnectionChatter())  # before the redaction's regex


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers[:] = []
        log.propagate = True
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    protect_uvicorn_loggers(level.upper())
