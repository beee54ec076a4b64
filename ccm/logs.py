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
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from ccm.server.auth import RedactTokens

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
