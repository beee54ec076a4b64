"""Who may reach a real server: the WebSocket and the HTTP API need the key (and a wrong one has
no effect), `/healthz` shows nothing, requests from a foreign browser origin are refused, and no
key or token is ever logged."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from ccm.store.models import clients, connections
from tests.server.scenario import (
    PLAN,
    assert_quiet,
    connect_device,
    count_rows,
    sessions_in_sql,
)
from tests.server.support import API_KEY, ServerThread, run
from tests.support import wait_until

# -- helpers ---------------------------------------------------------------------------------


def token_url(server: ServerThread, token: str | None) -> str:
    base = f"ws://127.0.0.1:{server.port}/ws"
    return base if token is None else f"{base}?token={token}"


# -- 6.1 unauthenticated access --------------------------------------------------------------


class TestUnauthenticated:
    @pytest.mark.parametrize("token", [None, "", "wrong-key", API_KEY + "x", API_KEY[:-1]])
    def test_websocket_without_the_key_is_refused_before_the_upgrade(
        self, server: ServerThread, token: str | None
    ) -> None:
        """A missing or wrong token gets HTTP 403 on the upgrade; no client, no connection row."""

        async def scenario() -> None:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(token_url(server, token))
            assert info.value.response.status_code == 403
            assert server.registry.list_clients() == []
            assert await count_rows(server, connections) == 0
            assert await count_rows(server, clients) == 0

        run(scenario())

    def test_http_without_a_key_is_401_on_every_api_route(self, server: ServerThread) -> None:
        """Every `/api/*` route answers 401 without X-API-Key, whatever the method."""
        routes = [
            (method.upper(), path.replace("{", "").replace("}", ""))
            for path, operations in server.app.openapi()["paths"].items()
            if path.startswith("/api/")
            for method in operations
        ]
        assert len(routes) >= 12
        with httpx.Client(base_url=server.http_url, timeout=10) as http:
            for method, path in routes:
                response = http.request(method, path, json={} if method == "POST" else None)
                assert response.status_code == 401, (method, path, response.text)
                assert response.json() == {"detail": "Missing X-API-Key header"}

    def test_http_with_a_wrong_key_is_401_and_has_no_effect(self, server: ServerThread) -> None:
        """A wrong key gets 401 `Invalid API key`; a dispatch with it starts nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-a")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": "wrong"}, timeout=10
            ) as http:
                for path in ("/api/health", "/api/clients", "/api/sessions"):
                    response = await http.get(path)
                    assert response.status_code == 401
                    assert response.json() == {"detail": "Invalid API key"}
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-a", "request": PLAN}
                )
                assert response.status_code == 401
                assert response.json() == {"detail": "Invalid API key"}
            await assert_quiet(device)
            assert await sessions_in_sql(server) == []
            await device.close()

        run(scenario())

    def test_healthz_needs_no_key_and_shows_nothing(self, server: ServerThread) -> None:
        """`/healthz` answers without a key and reveals no key, client or database detail."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-secret-name")
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                response = await http.get("/healthz")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
            assert API_KEY not in response.text
            assert "dev-secret-name" not in response.text
            await device.close()

        run(scenario())


def test_no_key_or_token_in_logs(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """A registration and a refused token attempt leave neither token in any log message."""
    caplog.set_level(logging.INFO)
    wrong = "not-the-key-5f1c2a"

    async def scenario() -> None:
        device = await connect_device(server, "dev-logged")
        with pytest.raises(InvalidStatus):
            await websockets.connect(token_url(server, wrong))
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            await http.get("/api/health", headers={"X-API-Key": API_KEY})
            await http.get("/api/health", headers={"X-API-Key": wrong})
        await device.close()
        await asyncio.to_thread(
            wait_until,
            lambda: not server.registry.is_online("dev-logged"),
            5,
            "dev-logged to go offline",
        )

    run(scenario())
    messages = [record.getMessage() for record in caplog.records]
    assert any("client registered client_id=dev-logged" in m for m in messages)
    assert any("refused websocket" in m for m in messages)
    for message in messages:
        assert API_KEY not in message
        assert wrong not in message


# -- 6.12 DNS rebinding and cross-origin calls -----------------------------------------------


class TestLocalOnly:
    @pytest.mark.parametrize(
        "headers",
        [
            {"Host": "evil.example"},
            {"Host": "evil.example:80"},
            {"Origin": "http://evil.example"},
            {"Origin": "http://localhost.evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
        ],
        ids=["host", "host-port", "origin", "origin-lookalike", "sec-fetch-site"],
    )
    def test_foreign_browser_requests_are_refused(
        self, server: ServerThread, headers: dict[str, str]
    ) -> None:
        """403 even with the right key, and a dispatch sent that way starts nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
            ) as http:
                response = await http.get("/api/clients", headers=headers)
                assert response.status_code == 403
                assert "dev-1" not in response.text
                assert "detail" in response.json()
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-1", "request": PLAN}, headers=headers
                )
                assert response.status_code == 403
            await assert_quiet(device)
            assert await sessions_in_sql(server) == []

        run(scenario())

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Host": "localhost:{port}"},
            {"Host": "127.0.0.1:{port}", "Origin": "http://localhost:3000"},
            {"Sec-Fetch-Site": "same-origin"},
        ],
        ids=["default", "localhost", "local-origin", "same-origin"],
    )
    def test_local_requests_are_served(self, server: ServerThread, headers: dict[str, str]) -> None:
        """Local Host and Origin values work."""
        filled = {k: v.format(port=server.port) for k, v in headers.items()}
        with server.http() as http:
            response = http.get("/api/health", headers=filled)
        assert response.status_code == 200
        assert response.json()["status"] == "healthy"

    def test_cross_origin_websocket_is_refused(self, server: ServerThread) -> None:
        """A WebSocket upgrade from a foreign Origin is refused (403) even with the token."""

        async def scenario() -> None:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(server.ws_url, origin="http://evil.example")
            assert info.value.response.status_code == 403
            assert server.registry.list_clients() == []

        run(scenario())
