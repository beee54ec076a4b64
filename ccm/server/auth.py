"""API keys and request origin checks for both HTTP and WebSocket.

Several keys may be valid at once, so a key can be rotated without downtime: from the settings
(`server.api_key`, `server.api_keys`), or else from the key file `<data_dir>/api_key` (one key a
line), which a running server reads again when it changes (`ccm key add`, `ccm key revoke`).
Keys are compared in constant time; logs name a key by its fingerprint, never the key. When the
server is bound to loopback, the Host header must name a local host and cross-site browser
requests are refused (DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Receive, Scope, Send

from ccm.config import Settings
from ccm.errors import ConfigError
from ccm.logs import bind

logger = logging.getLogger(__name__)

API_KEY_FILE = "api_key"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
LOOPBACK_BINDS = {"127.0.0.1", "localhost", "::1", "[::1]"}
USE_LOG_SECONDS = 60.0
"""A key's use is logged at INFO at most this often per key and transport."""


class Via(StrEnum):
    """How a key was presented."""

    WEBSOCKET = "websocket"
    HTTP = "http"
    METRICS = "metrics"


def fingerprint(key: str) -> str:
    """The first 8 hex digits of the key's SHA-256: names a key in logs and `ccm key list`
    without revealing it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def keys_match(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# -- the key file ------------------------------------------------------------------------------


def read_key_file(path: Path) -> list[str]:
    """The keys in a key file, oldest first: one a line; blank lines and `#` comments skipped."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split("#", 1)[0].strip()
        if key and key not in keys:
            keys.append(key)
    return keys


def _write_key_file(path: Path, keys: list[str]) -> None:
    """Replace the file in one rename, mode 0600, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".api_key.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{key}\n" for key in keys))
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def new_key() -> str:
    return secrets.token_urlsafe(32)


def add_key(path: Path) -> str:
    """Append a new random key to the key file (created if missing) and return it."""
    keys = read_key_file(path) if path.is_file() else []
    key = new_key()
    _write_key_file(path, [*keys, key])
    return key


def revoke_key(path: Path, prefix: str) -> str:
    """Remove the key whose fingerprint starts with `prefix`; returns that fingerprint. The last
    key is never removed: clients would be locked out until a restart generates a new one."""
    if not path.is_file():
        raise ConfigError(f"no key file at {path}: nothing to revoke")
    keys = read_key_file(path)
    found = [key for key in keys if fingerprint(key).startswith(prefix.strip().lower())]
    if not found:
        listed = ", ".join(fingerprint(k) for k in keys)
        raise ConfigError(f"no key in {path} has fingerprint {prefix!r}; the keys are {listed}")
    if len(found) > 1:
        raise ConfigError(f"fingerprint {prefix!r} matches {len(found)} keys: give more digits")
    if len(keys) == 1:
        raise ConfigError(
            f"{fingerprint(found[0])} is the only key in {path}: add its successor first "
            "(ccm key add), move the clients to it, then revoke this one"
        )
    _write_key_file(path, [key for key in keys if key != found[0]])
    return fingerprint(found[0])


def configured_keys(settings: Settings) -> list[str]:
    """Keys from the settings (`server.api_key`, then `server.api_keys`), without repeats."""
    keys: list[str] = []
    for key in [settings.server.api_key, *settings.server.api_keys]:
        if key and key not in keys:
            keys.append(key)
    return keys


def resolve_api_key(settings: Settings) -> tuple[str, bool]:
    """The key a client should use (the newest one: configured, or in the key file), creating
    the key file with a new key (mode 0600) if there is none. Returns (key, generated_now)."""
    configured = configured_keys(settings)
    if configured:
        return configured[-1], False
    path = Path(settings.data_dir) / API_KEY_FILE
    if path.is_file():
        keys = read_key_file(path)
        if keys:
            return keys[-1], False
    key = new_key()
    _write_key_file(path, [key])
    return key, True


# -- checking keys -----------------------------------------------------------------------------


class KeyRing:
    """The keys a running server accepts.

    Keys given explicitly are fixed. Keys of the key file are read again whenever the file
    changes (one `stat` per check), so a key added or revoked with `ccm key` counts at once; a
    file that vanishes or empties keeps the keys read before it, with a warning."""

    def __init__(
        self,
        keys: list[str],
        file: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = file
        self._fixed = list(keys)
        self._from_file: list[str] = []
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._clock = clock
        self._logged: dict[tuple[str, Via], float] = {}
        self._refresh()

    def _refresh(self) -> None:
        if self.file is None:
            return
        try:
            st = self.file.stat()
        except OSError:
            st = None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = read_key_file(self.file) if st else []
        except OSError as exc:
            logger.warning(
                "cannot read key file %s: %s; keeping the keys read before", self.file, exc
            )
            return
        if not keys:
            logger.warning(
                "key file %s is missing or empty; keeping the keys read before", self.file
            )
            return
        if self._from_file and keys != self._from_file:
            logger.info("key file reloaded keys=%s", ",".join(fingerprint(key) for key in keys))
        self._from_file = keys

    def keys(self) -> list[str]:
        with self._lock:
            self._refresh()
            return [*self._fixed, *self._from_file]

    def match(self, given: str | None, via: Via) -> str | None:
        """The fingerprint of the key `given` is, or None. Every key is compared (constant time
        each, no early exit), so the time taken does not tell which key was close."""
        if not given:
            return None
        found = None
        for key in self.keys():
            if keys_match(given, key):
                found = key
        if found is None:
            return None
        print_ = fingerprint(found)
        self._note_use(print_, via)
        return print_

    def _note_use(self, print_: str, via: Via) -> None:
        now = self._clock()
        with self._lock:
            last = self._logged.get((print_, via))
            if last is not None and now - last < USE_LOG_SECONDS:
                return
            self._logged[(print_, via)] = now
        logger.info("api key in use key=%s via=%s", print_, via.value)


def key_ring(settings: Settings, *, api_key: str | None = None) -> KeyRing:
    """The server's keys: `api_key` alone if given (tests, embedding), else the configured keys,
    else the key file (created with a new key if missing)."""
    if api_key:
        return KeyRing([api_key])
    configured = configured_keys(settings)
    if configured:
        return KeyRing(configured)
    resolve_api_key(settings)
    return KeyRing([], Path(settings.data_dir) / API_KEY_FILE)


def authenticate(app: Any, given: str | None, via: Via) -> str | None:
    """Check a key presented to `app`: its fingerprint (also bound to the log context, so the
    connection's lines name the key), or None if no key of the server matches."""
    ring: KeyRing = app.state.keys
    print_ = ring.match(given, via)
    if print_ is not None:
        bind(key=print_)
    return print_


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


async def require_api_key(
    request: Request, given: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    """FastAPI dependency: 401 unless X-API-Key is one of the server's keys."""
    if given is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Missing X-API-Key header")
    if authenticate(request.app, given, Via.HTTP) is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Invalid API key")


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin_is_local(origin: str) -> bool:
    match = re.match(r"^[a-z][a-z0-9+.-]*://([^/]+)", origin.strip().lower())
    return match is not None and _host_name(match.group(1)) in LOCAL_HOSTS


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
