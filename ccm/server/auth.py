"""API keys and request origin checks for both HTTP and WebSocket.

The key is compared in constant time. When the server is bound to loopback, the Host header must
name a local host and cross-site browser requests are refused (DNS rebinding, 6.12).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Receive, Scope, Send

from ccm.config import Settings

logger = logging.getLogger(__name__)

API_KEY_FILE = "api_key"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
LOOPBACK_BINDS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def keys_match(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def resolve_api_key(settings: Settings) -> tuple[str, bool]:
    """The configured key, or the one stored in the data directory, or a new one written there
    with mode 0600. Returns (key, generated_now)."""
    if settings.server.api_key:
        return settings.server.api_key, False
    path = Path(settings.data_dir) / API_KEY_FILE
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    return key, True


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def require_api_key(
    request: Request, given: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    """FastAPI dependency: 401 unless X-API-Key matches."""
    if given is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Missing X-API-Key header")
    if not keys_match(given, request.app.state.api_key):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Invalid API key")


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_is_local(origin: str) -> bool:
    match = re.match(r"^[a-z][a-z0-9+.-]*://([^/]+)", origin.strip().lower())
    return bool(match) and _host_name(match.group(1)) in LOCAL_HOSTS


class LocalOnlyGuard:
    """ASGI middleware for a loopback-bound server: Host must be local, no cross-site callers."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = LOCAL_HOSTS | {h.lower() for h in allowed_hosts}

    def _problem(self, scope: Scope) -> str | None:
        # A function of its own, so the decoded headers are not kept alive for as long as a
        # WebSocket lives in __call__'s frame (about 1 KB per idle connection).
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if _host_name(headers.get("host", "")) not in self.allowed:
            return "Host header is not a local host name"
        if "origin" in headers and not _origin_is_local(headers["origin"]):
            return "cross-origin requests are not allowed"
        if headers.get("sec-fetch-site") == "cross-site":
            return "cross-site requests are not allowed"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in {"http", "websocket"}:
            problem = self._problem(scope)
            if problem is not None:
                logger.warning("refused request: %s", problem)
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": problem})
                    return
                body = ('{"detail":"' + problem + '"}').encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def is_loopback_bind(host: str) -> bool:
    return host.lower() in LOOPBACK_BINDS
