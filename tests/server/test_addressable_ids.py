"""Every id that registration accepts is addressable in every HTTP id route, percent-encoded:
`/`, `%`, `?`, `#`, spaces, `+`, `&`, non-ASCII, and ids that look like encodings or paths."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.server.support import API_KEY, AipClient, ServerThread, run, track

ODD_IDS = [
    "auth/slash-dev",
    "a/b/c/",
    "/leading",
    "per%cent",
    "%2F-already-encoded",
    "what?x=1",
    "hash#tag",
    "two  spaces ",
    "plus+and&amp",
    "ünïcödé-日本-🤖",
    "back\\slash",
    "semi;colon,comma",
    "a/connections",
]


def encoded(client_id: str) -> str:
    return quote(client_id, safe="")


async def register(server: ServerThread, client_id: str) -> AipClient:
    client = track(await AipClient.connect(server.ws_url))
    reply = await client.register_device(client_id, tags=["odd"])
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), (client_id, reply)
    return client


@pytest.mark.parametrize("client_id", ODD_IDS)
def test_device_detail_and_history_for_any_registered_id(
    server: ServerThread, client_id: str
) -> None:
    """`/api/devices/{id}` and `/api/clients/{id}/connections` find a device whatever its id."""

    async def scenario() -> dict[str, httpx.Response]:
        await register(server, client_id)
        await wait_for_history(server)
        async with api(server) as http:
            return {
                "detail": await http.get(f"/api/devices/{encoded(client_id)}"),
                "history": await http.get(f"/api/clients/{encoded(client_id)}/connections"),
                "list": await http.get("/api/devices"),
            }

    answers = run(scenario())
    assert answers["detail"].status_code == 200, answers["detail"].text
    assert answers["detail"].json()["device_id"] == client_id
    assert answers["history"].status_code == 200, answers["history"].text
    history = answers["history"].json()["items"]
    assert [row["client_id"] for row in history] == [client_id]
    assert client_id in answers["list"].json()["devices"]


def test_a_prefix_of_a_slashed_id_is_not_that_device(server: ServerThread) -> None:
    """`auth` is not `auth/slash-dev`: the whole path after `/api/devices/` is the id."""

    async def scenario() -> tuple[int, int]:
        await register(server, "auth/slash-dev")
        async with api(server) as http:
            prefix = await http.get("/api/devices/auth")
            longer = await http.get(f"/api/devices/{encoded('auth/slash-dev/x')}")
        return prefix.status_code, longer.status_code

    assert run(scenario()) == (404, 404)


def test_select_answers_an_odd_id(server: ServerThread) -> None:
    """`/api/devices/select` returns a device whose id needs encoding, as it is."""

    async def scenario() -> dict[str, Any]:
        await register(server, "sel/ect?#")
        async with api(server) as http:
            response = await http.get("/api/devices/select", params={"tags": "odd"})
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    assert run(scenario())["device_id"] == "sel/ect?#"


def api(server: ServerThread) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10)


async def wait_for_history(server: ServerThread) -> None:
    """The connection row is queued at registration: wait for its commit."""
    await asyncio.to_thread(server.flush)
