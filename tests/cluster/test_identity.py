"""Client ids are cluster-wide: at most one open connection per id, whatever node it is on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import connections
from tests.reliability.support import Proxy, RawPool, ServeProcess, wait_until
from tests.server.support import AipClient, run, track


def _connection_rows(db: Engine, client_id: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                select(connections)
                .where(connections.c.client_id == client_id)
                .order_by(connections.c.connected_at)
            )
        )


async def _register(url: str, client_id: str) -> tuple[AipClient, dict[str, Any]]:
    client = track(await AipClient.connect(url))
    reply = await client.register_device(client_id)
    return client, reply


def test_a_live_id_on_another_node_is_refused_under_reject(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """The holder answers its ping: the newcomer on another node is refused, the holder stays."""
    a, b = node("a"), node("b")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
        _holder, first = await _register(a.ws_url, "id-dev-1")
        _newcomer, second = await _register(b.ws_url, "id-dev-1")
        return first, second, await asyncio.to_thread(_connection_rows, db, "id-dev-1")

    first, second, rows = run(scenario())
    assert first["status"] == "ok"
    assert second["type"] == "error"
    assert "already registered" in second["error"]
    [row] = rows  # the holder's, still open; the newcomer left no row
    assert row.disconnected_at is None


def test_two_nodes_racing_on_one_id_cannot_both_win(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """The same id registered on three nodes at the same moment: exactly one is accepted."""
    nodes = [node("a"), node("b"), node("c")]

    async def scenario() -> tuple[list[dict[str, Any]], list[Any]]:
        replies = await asyncio.gather(
            *(_register(n.ws_url, "id-race") for n in nodes for _ in range(2))
        )
        return [reply for _client, reply in replies], await asyncio.to_thread(
            _connection_rows, db, "id-race"
        )

    replies, rows = run(scenario())
    assert sum(1 for r in replies if r.get("status") == "ok") == 1, replies
    assert len([r for r in rows if r.disconnected_at is None]) == 1


def test_takeover_closes_the_holder_on_another_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """Under `takeover`, the holder's node closes the old connection (`replaced`)."""
    env = {"CCM_DUPLICATE_POLICY": "takeover"}
    a, b = node("a", env=env), node("b", env=env)

    async def scenario() -> tuple[dict[str, Any], int | None, list[Any]]:
        holder, _first = await _register(a.ws_url, "id-dev-2")
        _newcomer, second = await _register(b.ws_url, "id-dev-2")
        try:
            while True:
                await holder.recv(timeout=10)
        except Exception:
            pass
        rows = await asyncio.to_thread(_connection_rows, db, "id-dev-2")
        return second, holder.ws.close_code, rows

    second, code, rows = run(scenario())
    assert second["status"] == "ok"
    assert code == 1008
    old, new = rows
    assert old.disconnect_reason == "replaced"
    assert new.disconnected_at is None


def test_a_stale_holder_on_another_node_gives_way(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """The holder no longer answers pings (its process is frozen): under `reject` the newcomer
    on another node is accepted at once and the old connection is closed as `stale`."""
    a, b = node("a"), node("b")

    async def scenario() -> tuple[dict[str, Any], list[Any], bool]:
        async with RawPool(a.port) as pool:
            frozen = await pool.connect()  # a raw client: answers pings only while it reads
            assert (await frozen.register("id-dev-3"))["status"] == "ok"
            _newcomer, reply = await _register(b.ws_url, "id-dev-3")
            rows = await asyncio.to_thread(_connection_rows, db, "id-dev-3")
            online = await asyncio.to_thread(
                wait_until, lambda: "id-dev-3" in a.online(), 10, "the newcomer listed on A"
            )
            return reply, rows, online

    reply, rows, _online = run(scenario())
    assert reply["status"] == "ok", reply.get("error")
    old, new = rows
    assert old.disconnect_reason == "stale"
    assert new.disconnected_at is None


def test_an_id_accepted_while_the_database_was_away_yields_to_its_holder(
    node: Callable[..., ServeProcess], db: Engine, pg_url: str
) -> None:
    """Node B cannot reach PostgreSQL: a REGISTER there goes on (as on one node) with its claim
    queued. When the database is back and the id turns out to be held on A, B closes the
    newcomer as `duplicate`; A's connection keeps the id."""
    with db.connect() as conn:
        port = conn.engine.url.port or 5432
    proxy = Proxy(port).start()
    try:
        a = node("a")
        b = node(
            "b",
            url=proxy.url_for(pg_url),
            env={"CCM_CLUSTER_LEASE": "30s", "CCM_SERVER_SEND_TIMEOUT": "1s"},
        )

        async def scenario() -> tuple[dict[str, Any], int | None, str | None, list[Any]]:
            _holder, first = await _register(a.ws_url, "id-dev-4")
            assert first["status"] == "ok"
            proxy.pause()
            newcomer, reply = await _register(b.ws_url, "id-dev-4")
            proxy.resume()
            with contextlib.suppress(Exception):
                while True:
                    await newcomer.recv(timeout=30)
            rows = await asyncio.to_thread(_connection_rows, db, "id-dev-4")
            return reply, newcomer.ws.close_code, newcomer.ws.close_reason, rows

        reply, code, reason, rows = run(scenario())
        assert reply["status"] == "ok", reply
        assert (code, reason) == (1008, "duplicate")
        [row] = rows  # the holder's, still open: the newcomer never got a row
        assert row.disconnected_at is None
    finally:
        proxy.resume()
        proxy.kill()
