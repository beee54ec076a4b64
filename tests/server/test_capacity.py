"""Capacity-aware dispatch on a real server: a device runs at most `max_concurrent_tasks`
sessions, the next ones wait as `pending` in arrival order, and a queue is bounded and emptied
when either side leaves; on SQLite and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.server.scenario import (
    assert_ok_frame,
    assert_quiet,
    constellation,
    device,
    expect_refused_task,
    one_session,
    send_task,
)
from tests.server.support import AipClient, ServerThread, run

DEVICE = "lab-pc-07"
Factory = Callable[..., ServerThread]


def busy_server(server_factory: Factory, tmp_path: Path, **overrides: Any) -> ServerThread:
    """A server whose device config gives DEVICE a capacity of one session."""
    config = tmp_path / "devices.yaml"
    config.write_text(f"devices:\n  {DEVICE}:\n    max_concurrent_tasks: 1\n")
    return server_factory(device_config=str(config), **overrides)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape's samples as {(name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def queued_ack(message: dict[str, Any], session_id: str) -> int:
    """A task ACK for a queued session: heartbeat/ok with its place in `metadata`."""
    assert (message["type"], message["status"], message["session_id"]) == (
        "heartbeat",
        "ok",
        session_id,
    ), message
    position: int = message["metadata"]["queue_position"]
    return position


async def report_done(dev: AipClient, session_id: str) -> None:
    await dev.send(
        type="task_end",
        status="completed",
        client_id=DEVICE,
        session_id=session_id,
        metadata={"result": session_id},
    )


async def one_running_one_waiting(server: ServerThread) -> tuple[AipClient, AipClient]:
    """The busy server's device and a constellation whose session s1 runs and s2 waits (1st)."""
    dev = await device(server, DEVICE, relay=True)
    con = await constellation(server, "nightly@lab", DEVICE)
    await send_task(con, DEVICE, "s1")
    assert_ok_frame(await con.recv(), "s1")
    await send_task(con, DEVICE, "s2")
    assert queued_ack(await con.recv(), "s2") == 1
    return dev, con


async def expect_task_end(client: AipClient, session_id: str, status: str) -> dict[str, Any]:
    end = await client.recv_type("task_end")
    assert (end["session_id"], end["status"]) == (session_id, status), end
    return end


def test_tasks_for_a_busy_device_wait_and_start_in_arrival_order(
    server_factory: Factory, tmp_path: Path
) -> None:
    """With capacity 1, the second and third TASK are ACKed with queue positions 1 and 2, stored
    pending, and handed to the device one by one as the sessions before them end."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        dev = await device(server, DEVICE, relay=True)
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1", "first")
        assert_ok_frame(await con.recv(), "s1")
        assert (await dev.recv_type("task"))["session_id"] == "s1"
        await send_task(con, DEVICE, "s2", "second")
        assert queued_ack(await con.recv(), "s2") == 1
        await send_task(con, DEVICE, "s3", "third")
        assert queued_ack(await con.recv(), "s3") == 2
        pending = one_session(server, "s2")
        assert (pending.state, pending.started_at) == ("pending", None)
        assert server.registry.device_load(DEVICE).queued == 2
        await report_done(dev, "s1")
        await expect_task_end(con, "s1", "completed")
        assert (await dev.recv_type("task"))["session_id"] == "s2"
        await report_done(dev, "s2")
        await expect_task_end(con, "s2", "completed")
        assert (await dev.recv_type("task"))["session_id"] == "s3"
        await report_done(dev, "s3")
        await expect_task_end(con, "s3", "completed")

    run(scenario())
    first, second, third = (one_session(server, s) for s in ("s1", "s2", "s3"))
    assert [first.state, second.state, third.state] == ["completed"] * 3
    assert second.started_at == first.ended_at  # it started in the slot s1 freed
    assert third.started_at == second.ended_at
    assert second.created_at < second.started_at


def test_a_task_past_the_queue_bound_is_refused_as_queue_full(
    server_factory: Factory, tmp_path: Path
) -> None:
    """With capacity 1 and a queue of 1, a third TASK gets an ERROR and TASK_END `failed` saying
    the queue is full, and leaves a failed row with reason `queue_full`."""
    server = busy_server(server_factory, tmp_path, **{"dispatch.max_queue_per_device": 1})

    async def scenario() -> None:
        await device(server, DEVICE, relay=True)
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1")
        assert_ok_frame(await con.recv(), "s1")
        await send_task(con, DEVICE, "s2")
        assert queued_ack(await con.recv(), "s2") == 1
        await send_task(con, DEVICE, "s3")
        await expect_refused_task(con, "s3", "its queue is full")
        assert server.registry.device_load(DEVICE).queued == 1  # s2 still waits

    run(scenario())
    refused = one_session(server, "s3")
    assert (refused.state, refused.reason) == ("failed", "queue_full")
    assert "max_queue_per_device" in (refused.error or "")


def test_a_queued_session_is_cancelled_when_its_requester_disconnects(
    server_factory: Factory, tmp_path: Path
) -> None:
    """A constellation that leaves while its session waits: the session is cancelled and the
    device is never handed it, though its slot frees later."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        dev = await device(server, DEVICE, relay=True)
        first = await constellation(server, "first@lab", DEVICE)
        second = await constellation(server, "second@lab", DEVICE)
        await send_task(first, DEVICE, "s1")
        assert_ok_frame(await first.recv(), "s1")
        assert (await dev.recv_type("task"))["session_id"] == "s1"
        await send_task(second, DEVICE, "s2")
        assert queued_ack(await second.recv(), "s2") == 1
        await second.close()
        await report_done(dev, "s1")
        await expect_task_end(first, "s1", "completed")
        await expect_task_end(dev, "s1", "completed")
        await assert_quiet(dev)

    run(scenario())
    cancelled = one_session(server, "s2")
    assert (cancelled.state, cancelled.reason) == ("cancelled", "constellation_disconnected")
    assert cancelled.started_at is None


def test_a_requester_that_leaves_never_starts_its_own_waiting_session(
    server_factory: Factory, tmp_path: Path
) -> None:
    """A constellation with one session running and one waiting leaves: both are cancelled,
    and the waiting one is never started in the slot the running one freed."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        dev, con = await one_running_one_waiting(server)
        await con.close()
        await expect_task_end(dev, "s1", "failed")
        await assert_quiet(dev)

    run(scenario())
    waiting = one_session(server, "s2")
    assert (waiting.state, waiting.started_at) == ("cancelled", None)


def test_queued_sessions_fail_when_their_device_disconnects(
    server_factory: Factory, tmp_path: Path
) -> None:
    """A device that leaves fails its running and its waiting sessions; each requester gets a
    TASK_END `failed`."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        dev, con = await one_running_one_waiting(server)
        await dev.close()
        ended = {(await con.recv_type("task_end"))["session_id"] for _ in range(2)}
        assert ended == {"s1", "s2"}

    run(scenario())
    for session_id in ("s1", "s2"):
        row = one_session(server, session_id)
        assert (row.state, row.reason) == ("failed", "device_disconnected")
    assert one_session(server, "s2").started_at is None


def test_http_dispatch_to_a_busy_device_answers_pending_with_its_place(
    server_factory: Factory, tmp_path: Path
) -> None:
    """POST /api/dispatch to a device at capacity answers 200 with state `pending` and its
    queue position; the row is pending until the running session ends."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        dev = await device(server, DEVICE, relay=True)
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1")
        assert_ok_frame(await con.recv(), "s1")
        assert (await dev.recv_type("task"))["session_id"] == "s1"
        with server.http() as http:
            response = http.post("/api/dispatch", json={"client_id": DEVICE, "request": "r"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["state"], body["queue_position"]) == ("pending", 1)
        assert one_session(server, body["session_id"]).state == "pending"
        await report_done(dev, "s1")
        assert (await dev.recv_type("task"))["session_id"] == body["session_id"]
        started = one_session(server, body["session_id"])
        assert (started.state, started.started_at is not None) == ("running", True)

    run(scenario())


def test_a_queued_session_is_interrupted_when_the_server_stops(
    server_factory: Factory, tmp_path: Path
) -> None:
    """A server that stops ends a waiting session as `interrupted`, as it does running ones."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> None:
        await device(server, DEVICE, relay=True)
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1")
        assert_ok_frame(await con.recv(), "s1")
        await send_task(con, DEVICE, "s2")
        assert queued_ack(await con.recv(), "s2") == 1
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        ended = {(await con.recv_type("task_end"))["session_id"] for _ in range(2)}
        assert ended == {"s1", "s2"}
        await stopping

    run(scenario())
    row = one_session(server, "s2")
    assert (row.state, row.reason) == ("interrupted", "server_shutdown")


def test_a_default_capacity_applies_to_devices_without_their_own(
    server_factory: Factory,
) -> None:
    """`dispatch.default_max_concurrent_tasks` limits a device the device config does not name."""
    server = server_factory(**{"dispatch.default_max_concurrent_tasks": 1})

    async def scenario() -> None:
        await device(server, "lab-pc-08", relay=True)
        con = await constellation(server, "nightly@lab", "lab-pc-08")
        await send_task(con, "lab-pc-08", "s1")
        assert_ok_frame(await con.recv(), "s1")
        await send_task(con, "lab-pc-08", "s2")
        assert queued_ack(await con.recv(), "s2") == 1

    run(scenario())


def test_a_device_declares_its_capacity_when_the_operator_allows_it(
    server_factory: Factory,
) -> None:
    """With `dispatch.capacity_from_registration`, a device's own `max_concurrent_tasks`
    (in its REGISTER system_info) is its capacity."""
    server = server_factory(**{"dispatch.capacity_from_registration": True})

    async def scenario() -> Any:
        await device(server, DEVICE, relay=True, max_concurrent_tasks=2)
        return server.registry.device_load(DEVICE)

    assert run(scenario()).capacity == 2


def test_a_device_declaring_its_capacity_is_not_believed_by_default(
    server_factory: Factory,
) -> None:
    """Without `dispatch.capacity_from_registration`, what a device declares is ignored: it
    stays unlimited."""
    server = server_factory()

    async def scenario() -> Any:
        await device(server, DEVICE, relay=True, max_concurrent_tasks=2)
        return server.registry.device_load(DEVICE)

    assert run(scenario()).capacity is None


def test_explained_selection_says_why_each_device_was_passed_over(
    server_factory: Factory, tmp_path: Path
) -> None:
    """GET /api/devices/select?explain=true answers the choice, each passed-over device under
    its first reason (a busy one as at_capacity) and the qualifying devices' scores."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> dict[str, Any]:
        await device(server, DEVICE, relay=True)
        await device(server, "lab-mac", platform="darwin")
        await device(server, "lab-pc-08")
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1")
        assert_ok_frame(await con.recv(), "s1")
        with server.http() as http:
            response = http.get(
                "/api/devices/select",
                params={"platform": "windows", "capabilities": "gui", "explain": "true"},
            )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    body = run(scenario())
    assert body["device_id"] == "lab-pc-08"
    assert body["system_info"]["hostname"] == "LAB-PC-07"  # the scenario devices' system info
    assert body["explain"]["rejected"] == {
        "wrong_platform": {"count": 1, "devices": [{"device_id": "lab-mac"}]},
        "at_capacity": {"count": 1, "devices": [{"device_id": DEVICE}]},
    }
    assert body["explain"]["scores"] == [
        {"device_id": "lab-pc-08", "free_capacity": None, "preferred_tags": 0}
    ]


def test_a_task_for_an_unknown_device_names_the_live_devices(server_factory: Factory) -> None:
    """An unscoped constellation's TASK for a device that is not connected is refused with the
    live devices it may use instead."""
    server = server_factory(**{"server.allow_unscoped_constellations": True})

    async def scenario() -> None:
        await device(server, "lab-pc-07")
        await device(server, "lab-pc-08")
        con = await constellation(server, "nightly@lab", None)
        await send_task(con, "lab-pc-99", "s1")
        await expect_refused_task(
            con,
            "s1",
            "Target device 'lab-pc-99' is not connected; live devices: 'lab-pc-07', 'lab-pc-08'",
        )

    run(scenario())


def test_running_and_queued_counts_are_visible_in_the_api_metrics_and_dashboard(
    server_factory: Factory, tmp_path: Path
) -> None:
    """With one session running and one queued on a device of capacity 1, /api/devices,
    /api/devices/{id}, /metrics and the dashboard snapshot all say so."""
    server = busy_server(server_factory, tmp_path)

    async def scenario() -> dict[str, Any]:
        await device(server, DEVICE, relay=True)
        con = await constellation(server, "nightly@lab", DEVICE)
        await send_task(con, DEVICE, "s1")
        assert_ok_frame(await con.recv(), "s1")
        await send_task(con, DEVICE, "s2")
        assert queued_ack(await con.recv(), "s2") == 1
        with server.http() as http:
            return {
                "devices": http.get("/api/devices").json(),
                "device": http.get(f"/api/devices/{DEVICE}").json(),
                "metrics": samples(http.get("/metrics").text),
                "snapshot": http.get("/api/dashboard/snapshot").json(),
            }

    seen = run(scenario())
    load = {"running": 1, "queued": 1, "capacity": 1}
    assert seen["devices"]["load"] == {DEVICE: load}
    assert seen["device"]["load"] == load
    metrics = seen["metrics"]
    assert metrics[("ccm_device_sessions", (("device_id", DEVICE), ("state", "running")))] == 1
    assert metrics[("ccm_device_sessions", (("device_id", DEVICE), ("state", "queued")))] == 1
    assert metrics[("ccm_queued_sessions", ())] == 1
    assert metrics[("ccm_devices_at_capacity", ())] == 1
    (listed,) = seen["snapshot"]["devices"]
    assert (listed["running"], listed["queued"], listed["capacity"]) == (1, 1, 1)
