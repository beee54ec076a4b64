"""A node that dies is declared dead by the others within a lease and reaped once; a node that
finds its own lease gone is fenced; SQLite stays a single node."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from ccm.store.models import connections, server_runs, sessions
from tests.cluster.conftest import LEASE
from tests.reliability.support import CCM, Proxy, ServeProcess, wait_until
from tests.server.support import AipClient, run, track

REAP_WITHIN = LEASE * 3 + 5
"""A lease, a renewal interval, and slack for a loaded machine."""


def _rows(db: Engine, table: Any, **where: str) -> list[Any]:
    query = select(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with db.connect() as conn:
        return list(conn.execute(query))


def _run_state(db: Engine, name: str) -> list[str]:
    with db.connect() as conn:
        rows = conn.execute(
            select(server_runs.c.state)
            .where(server_runs.c.name == name)
            .order_by(server_runs.c.started_at)
        )
        return [row[0] for row in rows]


async def _relay_session(
    device_url: str, constellation_url: str, device_id: str, session_id: str
) -> tuple[AipClient, AipClient]:
    """A relay device on one node, its constellation on another, a session running."""
    device = track(await AipClient.connect(device_url))
    assert (await device.register_device(device_id, relay=True))["status"] == "ok"
    constellation = track(await AipClient.connect(constellation_url))
    reply = await constellation.register_constellation(f"c@{device_id}", device_id)
    assert reply["status"] == "ok"
    await constellation.send(
        type="task",
        client_type="constellation",
        client_id=f"c@{device_id}",
        target_id=device_id,
        session_id=session_id,
        request="work",
        status="continue",
    )
    assert (await constellation.recv_type("heartbeat", timeout=10))["session_id"] == session_id
    await device.recv_type("task", timeout=10)
    return device, constellation


def test_a_killed_node_is_reaped_once_and_its_parties_told(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """kill -9 of the device's node: within a lease a survivor closes its connections as
    `node_lost`, fails its session, tells the constellation on another node, and frees the
    device's id, which registers again on a survivor."""
    a, b, _c = node("a"), node("b"), node("c")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        _device, constellation = await _relay_session(a.ws_url, b.ws_url, "d-dev-1", "d-s1")
        await asyncio.to_thread(a.kill)
        end = await constellation.recv_type("task_end", timeout=REAP_WITHIN)
        again = track(await AipClient.connect(b.ws_url))
        reply = await again.register_device("d-dev-1", relay=True)
        return end, reply

    end, reply = run(scenario())
    assert (end["status"], end["session_id"]) == ("failed", "d-s1")
    assert reply["status"] == "ok", reply
    [session] = _rows(db, sessions, session_id="d-s1")
    assert (session.state, session.reason) == ("failed", "node_lost")
    first, *_again = sorted(
        _rows(db, connections, client_id="d-dev-1"), key=lambda r: r.connected_at
    )
    assert first.disconnect_reason == "node_lost"
    assert _run_state(db, "a") == ["dead"]


def test_a_device_registering_while_its_dead_node_is_not_yet_reaped_gets_in_at_the_reap(
    node: Callable[..., ServeProcess],
) -> None:
    """A device of a killed node registers on a survivor at once, before the node's lease has
    run out: the survivor asks the dead node about the old connection and gets no answer, but
    the reap ends that wait, and the id is given to the device (not refused, and without
    waiting out the probe's send_timeout, made 60 s here so that the difference shows)."""
    a, b = node("a"), node("b", env={"CCM_SERVER_SEND_TIMEOUT": "60s"})

    async def scenario() -> tuple[dict[str, Any], float]:
        device = track(await AipClient.connect(a.ws_url))
        assert (await device.register_device("g-dev-1"))["status"] == "ok"
        await asyncio.to_thread(
            wait_until, lambda: "g-dev-1" in b.online(), 20, "b to list the device"
        )
        await asyncio.to_thread(a.kill)
        killed = time.monotonic()
        again = track(await AipClient.connect(b.ws_url))
        await again.send(
            type="register",
            client_id="g-dev-1",
            metadata={"system_info": {"device_id": "g-dev-1", "platform": "windows"}},
        )
        reply = await again.recv(timeout=90)
        return reply, time.monotonic() - killed

    reply, took = run(scenario())
    assert reply["status"] == "ok", reply
    assert took < 45, f"the registration waited {took:.0f} s for the dead node's answer"


def test_a_killed_node_restarted_at_its_address_closes_its_predecessor_at_once(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """kill -9 and a restart on the same host and port (a supervisor's restart): the new run
    sees its predecessor's process gone and closes what it held as `server_restart`, as a
    single node does, before a survivor's reaper would; the device registers again at once."""
    a, b = node("a", env={"CCM_CLUSTER_LEASE": "30s"}), node("b")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
        _device, constellation = await _relay_session(a.ws_url, b.ws_url, "r-dev-1", "r-s1")
        await asyncio.to_thread(a.kill)
        restarted = time.monotonic()
        await asyncio.to_thread(a.start)
        end = await constellation.recv_type("task_end", timeout=20)
        again = track(await AipClient.connect(a.ws_url))
        reply = await again.register_device("r-dev-1", relay=True)
        return end, reply, time.monotonic() - restarted

    end, reply, took = run(scenario())
    assert (end["status"], end["session_id"]) == ("failed", "r-s1")
    assert reply["status"] == "ok", reply
    assert took < 30, "the restart waited out the killed run's lease"
    [session] = _rows(db, sessions, session_id="r-s1")
    assert (session.state, session.reason) == ("interrupted", "server_restart")
    first, *_again = sorted(
        _rows(db, connections, client_id="r-dev-1"), key=lambda r: r.connected_at
    )
    assert first.disconnect_reason == "server_restart"
    assert _run_state(db, "a") == ["dead", "alive"]


def test_a_paused_node_is_fenced_and_its_late_writes_lose(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """SIGSTOP of the device's node past its lease: the others reap it. When it runs again it
    finds its lease gone: it closes its clients (1012) and rejoins as a new node, and the
    `completed` its device sent meanwhile lands nowhere: SQL keeps `failed` (node_lost), and the
    constellation was told `failed` once."""
    a, b = node("a"), node("b")

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        device, constellation = await _relay_session(a.ws_url, b.ws_url, "f-dev-1", "f-s1")
        assert a.process is not None
        a.process.send_signal(signal.SIGSTOP)
        await device.send(
            type="task_end",
            client_id="f-dev-1",
            session_id="f-s1",
            status="completed",
            metadata={"result": "late"},
        )
        first = await constellation.recv_type("task_end", timeout=REAP_WITHIN)
        a.process.send_signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            while True:
                await device.recv(timeout=REAP_WITHIN)
        ends = [first]
        with contextlib.suppress(TimeoutError):
            ends.append(await constellation.recv_type("task_end", timeout=LEASE * 2))
        return ends, device.ws.close_code

    ends, code = run(scenario())
    assert [(e["status"], e["session_id"]) for e in ends] == [("failed", "f-s1")]
    assert code == 1012
    [session] = _rows(db, sessions, session_id="f-s1")
    assert (session.state, session.reason) == ("failed", "node_lost")
    wait_until(lambda: _run_state(db, "a") == ["dead", "alive"], 20, "node a rejoined")


def test_a_node_cut_off_from_the_database_fences_itself(
    node: Callable[..., ServeProcess], db: Engine, pg_url: str
) -> None:
    """Node A reaches PostgreSQL through a proxy that freezes: A cannot renew its lease, so
    within a lease it closes its clients itself (they reconnect elsewhere), while a survivor
    reaps it; once the database is back A rejoins as a new node."""
    with db.connect() as conn:
        port = conn.engine.url.port or 5432
    proxy = Proxy(port).start()
    try:
        a = node("a", url=proxy.url_for(pg_url))
        node("b")
        wait_until(lambda: _renewed_after_b_joined(db), REAP_WITHIN, "a renewed with b alive")

        async def scenario() -> tuple[int | None, float]:
            device = track(await AipClient.connect(a.ws_url))
            assert (await device.register_device("p-dev-1"))["status"] == "ok"
            proxy.pause()
            cut = time.monotonic()
            with contextlib.suppress(Exception):
                while True:
                    await device.recv(timeout=REAP_WITHIN * 2)
            return device.ws.close_code, time.monotonic() - cut

        code, after = run(scenario())
        assert code == 1012
        assert after < REAP_WITHIN * 2
        wait_until(lambda: _run_state(db, "a")[:1] == ["dead"], REAP_WITHIN, "a reaped")
        proxy.resume()
        wait_until(lambda: "alive" in _run_state(db, "a"), 60, "node a rejoined")
    finally:
        proxy.resume()
        proxy.kill()


def _renewed_after_b_joined(db: Engine) -> bool:
    """Node a has renewed its lease since b joined, so a knows it is not alone."""
    with db.connect() as conn:
        rows = {
            row.name: row
            for row in conn.execute(select(server_runs).where(server_runs.c.state == "alive"))
        }
    a, b = rows.get("a"), rows.get("b")
    return a is not None and b is not None and a.renewed_at > b.started_at


def test_a_second_server_on_one_sqlite_file_is_refused_at_once(tmp_path: Path) -> None:
    """SQLite is one node: a second `ccm serve` on the same file stops at once with one line
    naming the file and the running server, and the first goes on serving."""
    url = f"sqlite:///{tmp_path / 'one.db'}"
    first = ServeProcess(url, tmp_path, name="first-").start()
    try:
        started = time.monotonic()
        second = subprocess.run(
            [str(CCM), "serve", "--port", "0", "--database-url", url, "--api-key", "k" * 20],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert "one.db" in lines[0]
        assert f"pid {first.pid}" in lines[0]
        assert time.monotonic() - started < 30
        assert first.health()["status"] == "healthy"
    finally:
        first.stop()
