"""The database away must not stop the memory-only routes: with the Postgres connection frozen
(the proxy in front of it stopped with SIGSTOP) and dozens of history reads hanging on it,
`/healthz`, `/api/health`, `/api/clients`, `/api/devices`, `/api/devices/{id}` and `/metrics`
still answer at once, and every history read answers 503 with a `detail` within a bounded time;
with the database stopped (proxy killed) history reads answer 503 at once. Never a 500.

Postgres only: on SQLite in WAL mode a writer's lock does not block readers, and there is no
connection to freeze.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy import make_url

from tests.reliability.support import API_KEY, Proxy, ServeProcess, wait_until

HISTORY_TIMEOUT = 2.0
SERVER_ENV = {
    "CCM_LIMITS_HISTORY_TIMEOUT": f"{HISTORY_TIMEOUT:g}s",
    "CCM_SERVER_SEND_TIMEOUT": "2s",
    "CCM_WRITER_RETRY_INTERVAL": "0.5s",
}
LIVE_BOUND = 2.0  # generous: the live routes answer in milliseconds; starved, they took 9 s
HISTORY_BOUND = 20.0  # generous: a hung read would wait on TCP keepalives for a minute or more
CONCURRENT_READS = 45
HISTORY_ROUTES = [
    "/api/sessions",
    "/api/sessions/some-session",
    "/api/clients/outage-dev/connections",
    "/api/task_result/some-task",
    "/api/stats",
]
LIVE_ROUTES = [
    "/healthz",
    "/api/health",
    "/api/clients",
    "/api/devices",
    "/api/devices/outage-dev",
    "/metrics",
]
# The writer's complaint while its database is away is expected; nothing else at ERROR.
OUTAGE_LOG = (r"store did not confirm writes", r"store writer")


@pytest.fixture
def proxied(
    database_url: str, backend: str, serve: Callable[..., ServeProcess]
) -> Iterator[tuple[ServeProcess, Proxy]]:
    if backend != "postgresql":
        pytest.skip("needs a database connection to freeze: Postgres only (see module doc)")
    proxy = Proxy(make_url(database_url).port or 5432).start()
    try:
        yield serve(env=SERVER_ENV, url=proxy.url_for(database_url)), proxy
    finally:
        if proxy.process is not None and proxy.process.poll() is None:
            proxy.resume()
        proxy.kill()


async def timed_get(http: httpx.AsyncClient, path: str, timeout: float) -> tuple[int, Any, float]:
    """Status, JSON body (or text) and seconds taken; a timeout is status 0."""
    started = time.monotonic()
    try:
        response = await http.get(path, timeout=timeout)
    except httpx.TimeoutException:
        return 0, None, time.monotonic() - started
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body, time.monotonic() - started


@contextlib.asynccontextmanager
async def device_online(server: ServeProcess) -> AsyncIterator[None]:
    """A device registered for the live routes to show, closed at the end."""
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "register",
                    "status": "ok",
                    "client_type": "device",
                    "client_id": "outage-dev",
                    "metadata": {"platform": "linux", "system_info": {"device_id": "outage-dev"}},
                }
            )
        )
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["status"] == "ok"
        yield


async def outage_round(server: ServeProcess, proxy: Proxy) -> tuple[list[Any], list[Any]]:
    """Freeze the database; CONCURRENT_READS history reads at once; while they hang, every
    live route, twice (the second time once the first reads have given up)."""
    async with (
        device_online(server),
        httpx.AsyncClient(
            base_url=server.http_url,
            headers={"X-API-Key": API_KEY},
            limits=httpx.Limits(max_connections=200),
        ) as http,
    ):
        proxy.pause()
        try:
            history = [
                asyncio.create_task(
                    timed_get(http, HISTORY_ROUTES[n % len(HISTORY_ROUTES)], HISTORY_BOUND)
                )
                for n in range(CONCURRENT_READS)
            ]
            await asyncio.sleep(0.5)  # the reads are in flight, holding whatever they hold
            live = [await timed_get(http, path, LIVE_BOUND) for path in LIVE_ROUTES]
            await asyncio.sleep(HISTORY_TIMEOUT)
            live += [await timed_get(http, path, LIVE_BOUND) for path in LIVE_ROUTES]
            return live, await asyncio.gather(*history)
        finally:
            proxy.resume()


def test_frozen_database_leaves_live_routes_fast_and_history_503(
    proxied: tuple[ServeProcess, Proxy],
) -> None:
    """Proxy frozen: every live route answers 200 within LIVE_BOUND while 45 history reads
    hang, and each of those answers 503 with a detail (none 500, none left hanging)."""
    server, proxy = proxied
    live, history = asyncio.run(outage_round(server, proxy))
    assert [(path, status) for path, (status, _, _) in zip(LIVE_ROUTES * 2, live, strict=True)] == [
        (path, 200) for path in LIVE_ROUTES * 2
    ]
    statuses = sorted({status for status, _, _ in history})
    assert statuses == [503], statuses
    assert all(isinstance(body, dict) and body.get("detail") for _, body, _ in history)
    assert any("limits.history_timeout" in body["detail"] for _, body, _ in history)
    # Back: history answers again (the stuck reads end on the engine's TCP timeouts).
    wait_until(
        lambda: (
            httpx.get(
                server.http_url + "/api/sessions", headers={"X-API-Key": API_KEY}, timeout=10
            ).status_code
            == 200
        ),
        120,
        "history reads to answer again after the freeze",
        interval=0.5,
    )
    assert server.problems(*OUTAGE_LOG) == []


def test_stopped_database_makes_history_503_at_once(proxied: tuple[ServeProcess, Proxy]) -> None:
    """Proxy killed (connections reset, new ones refused): every history route answers 503
    with a detail that says the database is unavailable; live routes answer 200."""
    server, proxy = proxied
    with httpx.Client(
        base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=HISTORY_BOUND
    ) as http:
        assert http.get("/api/sessions").status_code == 200
        proxy.kill()
        answers = {path: http.get(path) for path in HISTORY_ROUTES}
        live = {path: http.get(path, timeout=LIVE_BOUND).status_code for path in LIVE_ROUTES}
        proxy.start()  # back on the same port
        wait_until(
            lambda: http.get("/api/sessions").status_code == 200,
            60,
            "history reads to answer again",
            interval=0.5,
        )
    for path, response in answers.items():
        assert response.status_code == 503, (path, response.text)
        assert response.json()["detail"], path
    assert live == {path: 200 for path in LIVE_ROUTES if path != "/api/devices/outage-dev"} | {
        "/api/devices/outage-dev": 404
    }
    assert server.problems(*OUTAGE_LOG) == []
