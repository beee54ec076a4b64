"""Logging: one logger per module, ids bound per task with contextvars, text or JSON lines.

`bind(client_id=..., session_id=...)` adds fields to every record logged afterwards in the same
task (and in tasks it starts, which copy the context), the way structlog's contextvars do, so
handlers need not repeat ids. `configure_logging()` is called once by the CLI, never at import.
API keys never reach the output: no line carries a URL's query string (where the WebSocket key
travels), and every control or format character is escaped, so text a client chose can neither
forge a line nor drive the terminal that shows it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import unicodedata
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


_UNSAFE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}
# Planes 0, 1 and 14 hold every character of those categories (planes 2-13 are ideographs and
# unassigned, 15-16 private use); scanning only them keeps the import under 30 ms.
_UNSAFE_PLANES = (range(0x20000), range(0xE0000, 0xE1000))


def _unsafe_class() -> str:
    """A regex class of every code point a terminal or a log viewer may act on instead of showing
    it: controls (C0, DEL, C1 with NEL), format characters (bidi overrides and isolates, zero
    width joiners, the BOM), line and paragraph separators (U+2028/2029) and surrogates (a lone
    one cannot even be written as UTF-8). Built from runs, so the pattern stays small."""
    runs: list[list[int]] = []
    for plane in _UNSAFE_PLANES:
        for code in plane:
            if unicodedata.category(chr(code)) in _UNSAFE_CATEGORIES:
                if runs and runs[-1][1] == code - 1:
                    runs[-1][1] = code
                else:
                    runs.append([code, code])
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs
    )


_UNSAFE_CLASS = _unsafe_class()
_UNSAFE = re.compile(f"[{_UNSAFE_CLASS}]")
_JSON_UNSAFE = _UNSAFE  # json.dumps has already escaped C0 controls, `"` and `\\`
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON writes a code point beyond the BMP as its UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape_unsafe(text: str) -> str:
    """Client-chosen text (ids, error texts) as one visible line: `\\n`, `\\x1b`, `\\u2028`
    instead of characters that start a new line, move the cursor or reorder the text."""
    return _UNSAFE.sub(_escape, text)


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
        return escape_unsafe(super().formatMessage(record))  # the traceback is added after this

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            line += " " + " ".join(
                f"{k}={escape_unsafe(str(v))}" for k, v in ctx.items() if f"{k}=" not in line
            )
        return redact(line)  # whatever path the text took (arguments, context, traceback)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, bound ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in (getattr(record, "ctx", None) or {}).items():
            data[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        # Each text is redacted before encoding (afterwards a query at the end of a value would
        # take the closing quote with it). json escapes C0 controls itself; NEL, U+2028, bidi
        # controls and the like it leaves as they are, so they are escaped here (the line stays
        # valid JSON: `\\u2028` is JSON).
        return _JSON_UNSAFE.sub(_json_escape, json.dumps(data, default=str, ensure_ascii=False))


# A query string: `?` right after a path character, up to the next space (a quote that closes
# the path, as in uvicorn's lines, stays). The key may travel in any parameter, in any case or
# percent encoding (`?Token=`, `?tok%65n=`), so the rule
# is the simple one: no line keeps a query string (prose like `done? yes` is left alone).
_QUERY = re.compile(r"(?<=[\w/.~%-])\?(?!\[query hidden\])\S+?(?=\"?(?:\s|$))")
QUERY_HIDDEN = "?[query hidden]"
_HEADER_LINES = {"< %s: %s", "> %s: %s"}  # how websockets logs a handshake's headers at DEBUG
_SECRET_HEADERS = {"authorization", "x-api-key", "cookie", "proxy-authorization"}


def redact(text: str) -> str:
    """The text with every URL query string replaced by `?[query hidden]`."""
    if "?" not in text:  # every log line passes here: skip the regex when it cannot match
        return text
    return _QUERY.sub(QUERY_HIDDEN, text)


class RedactTokens(logging.Filter):
    """Logging filter that keeps API keys out of access and error logs: query strings go from the
    message and from every argument (uvicorn's access line and the WebSocket handshake lines
    logged at DEBUG carry the path with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if (
            record.msg in _HEADER_LINES  # a WebSocket handshake's headers, logged at DEBUG
            and isinstance(args, tuple)
            and len(args) == 2
            and str(args[0]).lower() in _SECRET_HEADERS
        ):
            record.args = (args[0], "[hidden]")
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        return True


def _redact_arg(value: object) -> object:
    if isinstance(value, int | float) or value is None:
        return value
    text = value if isinstance(value, str) else str(value)
    hidden = redact(text)
    return value if hidden == text else hidden


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
    # Neither format shows the caller's file, function or line: skip the stack walk that finds
    # them for every record (the knob the logging HOWTO's "Optimization" section documents; a
    # quarter of a line's cost, measured at 19 -> 14 µs).
    logging._srcfile = None
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


class Throttle:
    """Logs a repeated warning at most once per `interval` seconds, with how many were left out,
    so a flood (a database away under load, a connection flood) is one line, not thousands."""

    def __init__(self, log: logging.Logger, interval: float, clock: Any = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            msg = f"{msg} ({self._skipped} more like it in the last {self._interval:g} s)"
        self._skipped = 0
        self._next = now + self._interval
        self._log.warning(msg, *args)
