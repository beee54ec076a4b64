"""The closed sets of values some settings take (re-exported by ccm.config)."""

from __future__ import annotations

from enum import StrEnum


class DuplicatePolicy(StrEnum):
    REJECT = "reject"
    TAKEOVER = "takeover"


class SqliteSynchronous(StrEnum):
    OFF = "OFF"
    NORMAL = "NORMAL"
    FULL = "FULL"
    EXTRA = "EXTRA"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class DocsMode(StrEnum):
    """Who may read the OpenAPI description of the HTTP API."""

    KEY = "key"
    """`/openapi.json` needs `X-API-Key` like every route; no `/docs` or `/redoc` pages (a
    browser cannot send the header to them)."""
    PUBLIC = "public"
    """`/openapi.json`, `/docs` and `/redoc` without a key: for a development machine."""
    OFF = "off"
    """None of them."""
