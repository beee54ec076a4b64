"""Three nodes on one PostgreSQL database are one cluster: a device on one node and a
constellation on another work as on one node."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, make_url, select

from ccm.store.models import server_runs, sessions
from tests.reliability.support import ServeProcess, wait_until
from tests.server.support import AipClient, run, track

PLAN = json.dumps([{"tool_name": "add", "parameters": {"a": 2, "b": 3}, "tool_type": "action"}])


def _sessions(db: Engine) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(select(sessions)))


def _run_of(server: ServeProcess) -> str:
    health: dict[str, Any] = server.get("/api/health")
    return str(health["run_id"])


async def _device(url: str, client_id: str, *, relay: bool = True) -> AipClient:
    device = track(await AipClient.connect(url))
    reply = await device.register_device(client_id, relay=relay, supported_features=["demo"])
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return device


async def _constellation(url: str, client_id: str, target: str) -> AipClient:
    constellation = track(await AipClient.connect(url))
    reply = await constellation.register_constellation(client_id, target)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return constellation


def test_a_relay_task_crosses_nodes_and_ends_on_the_devices_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """A constellation on B sends a task to a device on A: ACK, TASK on A, the device's
    task_end comes back to B as `completed`; the session row names A's run."""
    a, b, _c = node("a"), node("b"), node("c")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        device = await _device(a.ws_url, "x-dev-1")
        constellation = await _constellation(b.ws_url, "x-con-1@x-dev-1", "x-dev-1")
        await constellation.send(
            type="task",
            client_type="constellation",
            client_id="x-con-1@x-dev-1",
            target_id="x-dev-1",
            session_id="x-s1",
            request="do it",
            task_name="t1",
            status="continue",
        )
        ack = await constellation.recv_type("heartbeat", timeout=10)
        task = await device.recv_type("task", timeout=10)
        await device.send(
            type="task_end",
            client_id="x-dev-1",
            session_id=task["session_id"],
            status="completed",
            metadata={"result": {"answer": 42}},
        )
        end = await constellation.recv_type("task_end", timeout=10)
        return ack, task, end

    ack, task, end = run(scenario())
    assert ack["session_id"] == "x-s1"
    assert (task["session_id"], task["user_request"]) == ("x-s1", "do it")
    assert (end["status"], end["session_id"], end["result"]) == (
        "completed",
        "x-s1",
        {"answer": 42},
    )
    [row] = _sessions(db)
    assert (row.state, row.device_id, row.constellation_id) == (
        "completed",
        "x-dev-1",
        "x-con-1@x-dev-1",
    )
    assert row.server_run_id == _run_of(a)


def test_a_tool_plan_runs_command_rounds_on_the_devices_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """Agent-driven: the COMMAND rounds stay on the device's node; the result reaches B."""
    a, b = node("a"), node("b")

    async def scenario() -> dict[str, Any]:
        device = await _device(a.ws_url, "x-dev-2", relay=False)
        constellation = await _constellation(b.ws_url, "x-con-2@x-dev-2", "x-dev-2")
        await constellation.send(
            type="task",
            client_type="constellation",
            client_id="x-con-2@x-dev-2",
            target_id="x-dev-2",
            session_id="x-s2",
            request=PLAN,
            status="continue",
        )
        command = await device.recv_type("command", timeout=10)
        [action] = command["actions"]
        await device.send(
            type="command_results",
            client_id="x-dev-2",
            session_id="x-s2",
            prev_response_id=command["response_id"],
            status="continue",
            action_results=[
                {"status": "success", "result": 5, "call_id": action["call_id"]},
            ],
        )
        return await constellation.recv_type("task_end", timeout=10)

    end = run(scenario())
    assert (end["status"], end["session_id"]) == ("completed", "x-s2")
    assert end["result"][0]["result"] == 5


def test_device_info_of_a_device_on_another_node(node: Callable[..., ServeProcess]) -> None:
    """DEVICE_INFO_REQUEST on B for a device on A answers with its system info."""
    a, b = node("a"), node("b")

    async def scenario() -> dict[str, Any]:
        await _device(a.ws_url, "x-dev-3")
        constellation = await _constellation(b.ws_url, "x-con-3@x-dev-3", "x-dev-3")
        await constellation.send(
            type="device_info_request",
            client_type="constellation",
            client_id="x-con-3@x-dev-3",
            target_id="x-dev-3",
            request_id="r-1",
        )
        return await constellation.recv_type("device_info_response", timeout=10)

    reply = run(scenario())
    assert (reply["status"], reply["response_id"]) == ("ok", "r-1")
    assert reply["result"]["device_id"] == "x-dev-3"
    assert reply["result"]["supported_features"] == ["demo"]


def test_http_dispatch_from_any_node_runs_on_the_devices_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """POST /api/dispatch on B for a device on A: the device gets the task, B answers with the
    session id that runs."""
    a, b = node("a"), node("b")

    async def scenario() -> tuple[Any, dict[str, Any]]:
        device = await _device(a.ws_url, "x-dev-4")
        reply = await asyncio.to_thread(
            b.post, "/api/dispatch", {"client_id": "x-dev-4", "request": "via http"}
        )
        task = await device.recv_type("task", timeout=10)
        return reply, task

    reply, task = run(scenario())
    assert reply.status_code == 200, reply.text
    assert reply.json()["session_id"] == task["session_id"]
    assert task["user_request"] == "via http"
    missing = b.post("/api/dispatch", {"client_id": "nobody", "request": "x"})
    assert missing.status_code == 404


def test_every_node_answers_for_the_whole_cluster(node: Callable[..., ServeProcess]) -> None:
    """/api/clients, /api/devices, /api/devices/{id}, /api/devices/select and /api/nodes list
    the clients and nodes of the whole cluster, from any node."""
    a, b, c = node("a"), node("b"), node("c")

    async def scenario() -> None:
        await _device(a.ws_url, "x-dev-5")
        await _device(b.ws_url, "x-dev-6")
        await _constellation(c.ws_url, "x-con-5@x-dev-5", "x-dev-5")
        for server in (a, b, c):
            await asyncio.to_thread(
                wait_until,
                lambda s=server: {"x-dev-5", "x-dev-6", "x-con-5@x-dev-5"} <= s.online(),
                10,
                "every client listed by every node",
            )
            devices = await asyncio.to_thread(server.get, "/api/devices")
            assert set(devices["devices"]) == {"x-dev-5", "x-dev-6"}
            one = await asyncio.to_thread(server.get, "/api/devices/x-dev-6")
            assert one["system_info"]["device_id"] == "x-dev-6"
            chosen = await asyncio.to_thread(server.get, "/api/devices/select", capabilities="demo")
            assert chosen["device_id"] in {"x-dev-5", "x-dev-6"}
            nodes = await asyncio.to_thread(server.get, "/api/nodes")
            by_name = {n["name"]: n for n in nodes["nodes"] if n["state"] == "alive"}
            assert set(by_name) == {"a", "b", "c"}
            assert (by_name["a"]["clients"], by_name["c"]["clients"]) == (1, 1)

    run(scenario())


def test_a_node_stopped_cleanly_leaves_the_cluster_at_once(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """SIGTERM on one node: its sessions that cross to another node end with task_end `failed`
    there, its clients are closed with 1001, and its run is `left` at once."""
    a, b = node("a"), node("b")

    async def scenario() -> tuple[dict[str, Any], int | None]:
        device = await _device(a.ws_url, "x-dev-7")
        constellation = await _constellation(b.ws_url, "x-con-7@x-dev-7", "x-dev-7")
        await constellation.send(
            type="task",
            client_type="constellation",
            client_id="x-con-7@x-dev-7",
            target_id="x-dev-7",
            session_id="x-s7",
            request="long",
            status="continue",
        )
        await device.recv_type("task", timeout=10)
        assert await asyncio.to_thread(a.terminate) == 0
        end = await constellation.recv_type("task_end", timeout=10)
        with contextlib.suppress(Exception):
            await device.recv(timeout=5)
        return end, device.ws.close_code

    end, code = run(scenario())
    assert (end["status"], end["session_id"]) == ("failed", "x-s7")
    assert code == 1001
    with db.connect() as conn:
        states = dict(conn.execute(select(server_runs.c.name, server_runs.c.state)).all())
    assert states["a"] == "left"
    assert states["b"] == "alive"


def test_a_node_on_a_multi_host_url_joins_through_the_writable_host(
    node: Callable[..., ServeProcess], pg_url: str
) -> None:
    """A libpq multi-host URL (`host=a,b`, `target_session_attrs=read-write`, the form a
    PostgreSQL failover pair uses) works for the node and its bus listener: the first host is
    down here, the node joins through the second and serves a cross-node task."""
    url = make_url(pg_url)
    multi = url.set(host=None, port=None).update_query_pairs(
        [
            ("host", "127.0.0.1:1"),
            ("host", f"{url.host}:{url.port or 5432}"),
            ("target_session_attrs", "read-write"),
        ]
    )
    a = node("a", url=multi.render_as_string(hide_password=False))
    b = node("b")

    async def scenario() -> dict[str, Any]:
        device = await _device(a.ws_url, "x-dev-9")
        constellation = await _constellation(b.ws_url, "x-con-9@x-dev-9", "x-dev-9")
        await constellation.send(
            type="task",
            client_type="constellation",
            client_id="x-con-9@x-dev-9",
            target_id="x-dev-9",
            session_id="x-s9",
            request="over two hosts",
            status="continue",
        )
        task = await device.recv_type("task", timeout=10)
        await device.send(
            type="task_end",
            client_id="x-dev-9",
            session_id=task["session_id"],
            status="completed",
            metadata={"result": "ok"},
        )
        return await constellation.recv_type("task_end", timeout=10)

    end = run(scenario())
    assert (end["status"], end["result"]) == ("completed", "ok")


def _start_task(constellation: AipClient, client_id: str, device_id: str, session_id: str) -> Any:
    return constellation.send(
        type="task",
        client_type="constellation",
        client_id=client_id,
        target_id=device_id,
        session_id=session_id,
        request="long",
        status="continue",
    )


def test_a_constellation_leaving_cancels_its_session_on_the_devices_node(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """The constellation on B disconnects: A cancels the session and tells the device."""
    a, b = node("a"), node("b")

    async def scenario() -> dict[str, Any]:
        device = await _device(a.ws_url, "x-dev-10")
        constellation = await _constellation(b.ws_url, "x-con-10@x-dev-10", "x-dev-10")
        await _start_task(constellation, "x-con-10@x-dev-10", "x-dev-10", "x-s10")
        await device.recv_type("task", timeout=10)
        await constellation.close()
        return await device.recv_type("task_end", timeout=10)

    end = run(scenario())
    assert (end["status"], end["session_id"]) == ("failed", "x-s10")
    [row] = [r for r in _sessions(db) if r.session_id == "x-s10"]
    assert (row.state, row.reason) == ("cancelled", "constellation_disconnected")


def test_a_device_leaving_fails_its_session_and_tells_the_constellation_elsewhere(
    node: Callable[..., ServeProcess], db: Engine
) -> None:
    """The device on A disconnects: its session fails and the constellation on B is told."""
    a, b = node("a"), node("b")

    async def scenario() -> dict[str, Any]:
        device = await _device(a.ws_url, "x-dev-11")
        constellation = await _constellation(b.ws_url, "x-con-11@x-dev-11", "x-dev-11")
        await _start_task(constellation, "x-con-11@x-dev-11", "x-dev-11", "x-s11")
        await device.recv_type("task", timeout=10)
        await device.close()
        return await constellation.recv_type("task_end", timeout=10)

    end = run(scenario())
    assert (end["status"], end["session_id"]) == ("failed", "x-s11")
    assert end["error"] == "Task was cancelled because target device disconnected"
    [row] = [r for r in _sessions(db) if r.session_id == "x-s11"]
    assert (row.state, row.reason) == ("failed", "device_disconnected")


def test_the_dashboard_shows_the_nodes_and_which_node_holds_each_client(
    node: Callable[..., ServeProcess],
) -> None:
    """The page's snapshot on B lists both nodes and a device of A with A's name."""
    a, b = node("a"), node("b")

    async def scenario() -> dict[str, Any]:
        await _device(a.ws_url, "x-dev-12")

        def listed() -> dict[str, Any] | None:
            snapshot: dict[str, Any] = b.get("/api/dashboard/snapshot")
            ids = {d["client_id"] for d in snapshot["devices"]}
            return snapshot if "x-dev-12" in ids else None

        return await asyncio.to_thread(wait_until, listed, 10, "A's device on B's page")

    snapshot = run(scenario())
    [dev] = [d for d in snapshot["devices"] if d["client_id"] == "x-dev-12"]
    assert dev["node"] == "a"
    names = {n["name"]: n for n in snapshot["nodes"]}
    assert set(names) == {"a", "b"}
    assert names["b"]["this_node"]
    assert names["a"]["clients"] == 1
