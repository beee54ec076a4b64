"""The running server's HTTP API as the command line uses it (`ccm status`, `ccm dispatch`).

Where the server is and which key to send come from the options, else from the settings and
the key file, the way `ccm serve` found them; every failure is one CcmError line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ccm.config import Settings
from ccm.domain import FINISHED_STATES, SessionState
from ccm.errors import CcmError
from ccm.server.auth import API_KEY_FILE, configured_keys, read_key_file

WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def server_url(settings: Settings) -> str:
    """`http://host:port` of the server these settings start (a wildcard bind via loopback)."""
    host = settings.server.host
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}"


def client_key(settings: Settings, given: str | None = None) -> str:
    """The key a client sends: `given`, else the newest configured key, else the newest key of
    the key file (after `ccm key add`, clients move to the new key)."""
    if given:
        return given
    configured = configured_keys(settings)
    if configured:
        return configured[-1]
    path = Path(settings.data_dir) / API_KEY_FILE
    keys = read_key_file(path) if path.is_file() else []
    if not keys:
        raise CcmError(
            f"no API key: pass --api-key, set CCM_SERVER_API_KEY, or run from the directory "
            f"where `ccm serve` keeps {path}"
        )
    return keys[-1]


class ServerApi:
    """A few calls to a running ccm, each answered with JSON or one CcmError line."""

    def __init__(self, base: str, key: str, *, timeout: float = 10) -> None:
        self.base = base.rstrip("/")
        self._http = httpx.Client(base_url=self.base, headers={"X-API-Key": key}, timeout=timeout)

    def __enter__(self) -> ServerApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CcmError(
                f"cannot reach {self.base}: {exc or type(exc).__name__}; is `ccm serve` running "
                "there? (--url names another server)"
            ) from None
        if answer.status_code == 401:
            raise CcmError(
                f"{self.base} refused the API key (401): check --api-key or the key file"
            )
        if answer.status_code >= 400:
            try:
                detail = answer.json().get("detail", answer.text)
            except ValueError:
                detail = answer.text
            raise CcmError(f"{self.base}{path} answered {answer.status_code}: {str(detail)[:300]}")
        return answer.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def session(self, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/api/sessions/{quote(session_id, safe='')}")
        return result

    def dispatch(self, device_id: str, request: str, task_name: str | None) -> dict[str, Any]:
        body = {"client_id": device_id, "request": request}
        if task_name is not None:
            body["task_name"] = task_name
        result: dict[str, Any] = self.call("POST", "/api/dispatch", json=body)
        return result

    def wait_for_end(
        self,
        session_id: str,
        *,
        timeout: float,
        poll: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:
        """Poll the session until it reaches a final state; CcmError after `timeout` seconds."""
        deadline = clock() + timeout
        while True:
            row = self.session(session_id)
            if SessionState(row["state"]) in FINISHED_STATES:
                return row
            if clock() >= deadline:
                raise CcmError(
                    f"session {session_id} is still {row['state']} after {timeout:g} s; it goes "
                    f"on running: `ccm audit session {session_id}` shows how it ends"
                )
            sleep(poll)
