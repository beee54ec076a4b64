"""The OpenAPI description as `server.docs` says: behind the key by default, public, or off."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.server.conftest import server_factory
from tests.server.support import API_KEY, ServerThread

__all__ = ["server_factory"]

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _status(server: ServerThread, path: str, key: str | None = None) -> int:
    headers = {"X-API-Key": key} if key else {}
    return httpx.get(server.http_url + path, headers=headers, timeout=10).status_code


def test_openapi_needs_the_key_by_default(server_factory: Callable[..., ServerThread]) -> None:
    """Default `key`: `/openapi.json` answers 401 without the key and 200 with it; the HTML
    pages, which could not send the key, are not served."""
    server = server_factory()
    assert _status(server, "/openapi.json") == 401
    assert _status(server, "/openapi.json", API_KEY) == 200
    assert _status(server, "/docs") == 404
    assert _status(server, "/redoc") == 404


def test_public_docs_answer_without_a_key(server_factory: Callable[..., ServerThread]) -> None:
    """`public`: the schema and both pages answer without a key (a development machine)."""
    server = server_factory(**{"server.docs": "public"})
    assert [_status(server, p) for p in ("/openapi.json", "/docs", "/redoc")] == [200, 200, 200]


def test_docs_off_serves_none_of_them(server_factory: Callable[..., ServerThread]) -> None:
    """`off`: not even with the key."""
    server = server_factory(**{"server.docs": "off"})
    assert _status(server, "/openapi.json", API_KEY) == 404
    assert _status(server, "/docs", API_KEY) == 404
