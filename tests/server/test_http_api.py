"""The HTTP API against a real server on SQLite and Postgres: every route with the key, UFO's four
routes in UFO's shapes, ccm's additions, and errors as JSON with a `detail`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from ccm.domain import SessionState
from ccm.server.runners import NO_RUNNER_ERROR
from ccm.store.repository import read_sessions
from tests.server.support import API_KEY, AipClient, ServerThread, run, track
from tests.support import wait_until

PLAN = json.dumps([{"tool_name": "echo", "parameters": {}, "tool_type": "action"}])
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BAD_NAME = (
    "Invalid task_name: must be a non-empty string of characters [A-Za-z0-9._-] "
    "and must not start with '.'"
)


# -- helpers ---------------------------------------------------------------------------------


async def connect_device(server: ServerThread, client_id: str, **kwargs: Any) -> AipClient:
    client = await AipClient.connect(server.ws_url)
    track(client)
    reply = await client.register_device(client_id, **kwargs)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return client


async def connect_constellation(
    server: ServerThread, client_id: str, target_id: str | None
) -> AipClient:
    client = await AipClient.connect(server.ws_url)
    track(client)
    reply = await client.register_constellation(client_id, target_id)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return client


async def answer(device: AipClient, command: dict[str, Any], result: Any) -> None:
    """COMMAND_RESULTS as a stock device sends them: one success per action, call ids copied."""
    await device.send(
        type="command_results",
        status=command["status"],
        client_id=device.client_id,
        session_id=command["session_id"],
        prev_response_id=command["response_id"],
        action_results=[
            {"status": "success", "result": result, "call_id": action["call_id"]}
            for action in command["actions"]
        ],
    )


def api(server: ServerThread) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10)


def seed_sessions(server: ServerThread) -> list[str]:
    """Five finished or running sessions with known creation times (one hour apart), written
    through the server's own Store. Returns their session ids, oldest first."""
    store = server.app.state.store
    specs = [
        ("s1", "dev-1", "c-a", SessionState.COMPLETED),
        ("s2", "dev-1", None, SessionState.FAILED),
        ("s3", "dev-2", "c-b", SessionState.RUNNING),
        ("s4", "dev-2", "c-a", SessionState.CANCELLED),
        ("s5", "dev-1", "c-a", SessionState.COMPLETED),
    ]
    for i, (session_id, device_id, constellation_id, state) in enumerate(specs):
        at = T0 + timedelta(hours=i)
        store.record_session_created(
            id=f"run-{session_id}",
            session_id=session_id,
            task_name=f"task-{session_id}",
            request="do it",
            origin="constellation" if constellation_id else "http",
            constellation_id=constellation_id,
            device_id=device_id,
            mode="agent",
            state=SessionState.RUNNING,
            at=at,
        )
        if state is not SessionState.RUNNING:
            store.record_session_ended(
                id=f"run-{session_id}",
                state=state,
                reason=None,
                result={"session": session_id},
                error=None,
                at=at + timedelta(minutes=1),
            )
    server.flush()
    return [spec[0] for spec in specs]


def ids(page: dict[str, Any]) -> list[str]:
    return [item["session_id"] for item in page["items"]]


# -- health and clients ----------------------------------------------------------------------


def test_healthz_answers_with_and_without_a_key(server: ServerThread) -> None:
    """`/healthz` is a bare liveness probe."""
    with server.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
    with httpx.Client(base_url=server.http_url) as http:
        response = http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_health_lists_online_clients(server: ServerThread) -> None:
    """`/api/health` is UFO's `{"status": "healthy", "online_clients": [...]}` plus database
    figures."""

    async def scenario() -> dict[str, Any]:
        await connect_device(server, "dev-1")
        await connect_constellation(server, "n@dev-1", "dev-1")
        async with api(server) as http:
            response = await http.get("/api/health")
        assert response.status_code == 200
        return response.json()

    body = run(scenario())
    assert body["status"] == "healthy"
    assert body["online_clients"] == ["dev-1", "n@dev-1"]
    assert body["database"]["degraded"] is False
    assert body["database"]["last_error"] is None
    assert body["run_id"] == server.app.state.store.run_id


def test_clients_lists_both_roles_in_registration_order(server: ServerThread) -> None:
    """`/api/clients` has UFO's `online_clients` list and each client's role and platform."""

    async def scenario() -> dict[str, Any]:
        await connect_device(server, "dev-2", platform="linux")
        await connect_constellation(server, "n@dev-2", "dev-2")
        await connect_device(server, "dev-1")
        async with api(server) as http:
            return (await http.get("/api/clients")).json()

    body = run(scenario())
    assert body["online_clients"] == ["dev-2", "n@dev-2", "dev-1"]
    roles = {c["client_id"]: (c["client_type"], c["platform"]) for c in body["clients"]}
    assert roles == {
        "dev-2": ("device", "linux"),
        "n@dev-2": ("constellation", "windows"),
        "dev-1": ("device", "windows"),
    }
    assert all(c["connected_at"] and c["last_heartbeat_at"] for c in body["clients"])


def test_clients_forgets_a_client_that_left(server: ServerThread) -> None:
    """A disconnected client disappears from `/api/clients` and `/api/health`."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        await connect_device(server, "dev-1")
        leaving = await connect_device(server, "dev-2")
        await leaving.close()
        await asyncio.to_thread(
            wait_until, lambda: not server.registry.is_online("dev-2"), 5, "dev-2 to go offline"
        )
        async with api(server) as http:
            return (await http.get("/api/clients")).json(), (await http.get("/api/health")).json()

    clients, health = run(scenario())
    assert clients["online_clients"] == ["dev-1"]
    assert health["online_clients"] == ["dev-1"]


def test_connection_history_newest_first(server: ServerThread) -> None:
    """`/api/clients/{id}/connections` lists every connection with its close reason."""

    async def scenario() -> None:
        first = await connect_device(server, "dev-1")
        await first.close()
        await asyncio.to_thread(
            wait_until, lambda: not server.registry.is_online("dev-1"), 5, "dev-1 to go offline"
        )
        await connect_device(server, "dev-1")
        server.flush()
        async with api(server) as http:
            body = (await http.get("/api/clients/dev-1/connections")).json()
            assert [i["disconnect_reason"] for i in body["items"]] == [None, "closed"]
            newest, oldest = body["items"]
            assert newest["disconnected_at"] is None
            assert oldest["disconnected_at"] is not None
            connected = [datetime.fromisoformat(i["connected_at"]) for i in (newest, oldest)]
            assert connected[0] > connected[1]
            assert newest["client_type"] == "device"
            assert newest["server_run_id"] == server.app.state.store.run_id
            assert body["next_offset"] is None

            page = (await http.get("/api/clients/dev-1/connections", params={"limit": 1})).json()
            assert [i["connection_id"] for i in page["items"]] == [newest["connection_id"]]
            assert (page["limit"], page["offset"], page["next_offset"]) == (1, 0, 1)
            page = (
                await http.get("/api/clients/dev-1/connections", params={"limit": 1, "offset": 1})
            ).json()
            assert [i["connection_id"] for i in page["items"]] == [oldest["connection_id"]]

            since = {"since": newest["connected_at"]}
            page = (await http.get("/api/clients/dev-1/connections", params=since)).json()
            assert [i["connection_id"] for i in page["items"]] == [newest["connection_id"]]
            until = {"until": newest["connected_at"]}
            page = (await http.get("/api/clients/dev-1/connections", params=until)).json()
            assert [i["connection_id"] for i in page["items"]] == [oldest["connection_id"]]

            unknown = await http.get("/api/clients/nobody/connections")
            assert (unknown.status_code, unknown.json()["items"]) == (200, [])

    run(scenario())


# -- devices ---------------------------------------------------------------------------------


def test_devices_lists_ids_count_and_platforms(server: ServerThread) -> None:
    """`/api/devices` counts devices only, grouped by platform."""

    async def scenario() -> dict[str, Any]:
        await connect_device(server, "dev-w")
        await connect_device(server, "dev-l1", platform="linux")
        await connect_constellation(server, "n@dev-w", "dev-w")
        await connect_device(server, "dev-l2", platform="linux")
        async with api(server) as http:
            return (await http.get("/api/devices")).json()

    body = run(scenario())
    idle = {"running": 0, "queued": 0, "capacity": None}
    assert body == {
        "devices": ["dev-w", "dev-l1", "dev-l2"],
        "count": 3,
        "by_platform": {"windows": 1, "linux": 2},
        "load": {"dev-w": idle, "dev-l1": idle, "dev-l2": idle},
    }


def test_device_detail_for_live_devices_only(server: ServerThread) -> None:
    """`/api/devices/{id}` is 200 for a live device, 404 for a constellation or an unknown id."""

    async def scenario() -> None:
        await connect_device(server, "dev-1", platform="linux", hostname="host-1")
        await connect_constellation(server, "n@dev-1", "dev-1")
        async with api(server) as http:
            response = await http.get("/api/devices/dev-1")
            assert response.status_code == 200
            body = response.json()
            assert (body["device_id"], body["platform"]) == ("dev-1", "linux")
            assert body["system_info"]["hostname"] == "host-1"
            assert body["sessions"] == []
            assert body["connected_at"]
            for missing in ("n@dev-1", "nobody"):
                response = await http.get(f"/api/devices/{missing}")
                assert response.status_code == 404
                assert response.json() == {"detail": "Device not connected"}

    run(scenario())


def test_device_detail_lists_running_sessions(server: ServerThread) -> None:
    """A running session shows in its device's `sessions`."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            dispatched = await http.post(
                "/api/dispatch", json={"client_id": "dev-1", "request": PLAN}
            )
            await device.recv_type("command")
            body = (await http.get("/api/devices/dev-1")).json()
        assert body["sessions"] == [dispatched.json()["session_id"]]

    run(scenario())


class TestSelectDevice:
    def select(self, server: ServerThread, params: list[tuple[str, str]]) -> httpx.Response:
        async def scenario() -> httpx.Response:
            await connect_device(
                server, "dev-win", supported_features=["gui", "office"], tags=["lab"]
            )
            await connect_device(server, "dev-lin1", platform="linux", supported_features=["cli"])
            await connect_device(
                server,
                "dev-lin2",
                platform="linux",
                supported_features=["cli", "gui"],
                tags=["gpu", "lab"],
            )
            async with api(server) as http:
                return await http.get("/api/devices/select", params=params)

        return run(scenario())

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ([], "dev-win"),
            ([("platform", "linux")], "dev-lin1"),
            ([("platform", "LINUX")], "dev-lin1"),
            ([("platform", "linux"), ("tags", "gpu")], "dev-lin2"),
            ([("capabilities", "gui"), ("capabilities", "office")], "dev-win"),
            ([("capabilities", "cli,gui")], "dev-lin2"),
            ([("tags", "lab,gpu")], "dev-lin2"),
            ([("tags", "lab")], "dev-win"),
            ([("capabilities", "gui"), ("tags", "nothing")], "dev-win"),
        ],
        ids=[
            "any",
            "platform",
            "platform-case",
            "platform-tag",
            "capabilities-repeated",
            "capabilities-comma",
            "most-tags",
            "tag-tie-first-registered",
            "unknown-tag-is-a-preference",
        ],
    )
    def test_select_picks_the_best_device(
        self, server: ServerThread, params: list[tuple[str, str]], expected: str
    ) -> None:
        """`/api/devices/select` is `select_optimal_device` with its system info."""
        response = self.select(server, params)
        assert response.status_code == 200
        body = response.json()
        assert body["device_id"] == expected
        assert body["system_info"]["device_id"] == expected

    @pytest.mark.parametrize(
        "params",
        [[("platform", "mobile")], [("capabilities", "camera")], [("capabilities", "office,cli")]],
        ids=["platform", "capability", "capabilities-on-different-devices"],
    )
    def test_select_is_404_when_nothing_matches(
        self, server: ServerThread, params: list[tuple[str, str]]
    ) -> None:
        """No device with the platform and every capability: 404 with a detail."""
        response = self.select(server, params)
        assert response.status_code == 404
        assert response.json() == {
            "detail": "No connected device matches with room for a session; add explain=true "
            "to see why"
        }


def test_reload_config_re_merges_live_devices(
    server_factory: Callable[..., ServerThread], tmp_path: Path
) -> None:
    """`/api/devices/reload-config` re-reads the file; a broken file is 400, the old one stays."""
    config = tmp_path / "devices.yaml"
    config.write_text("devices:\n  dev-1:\n    tags: [lab]\n", encoding="utf-8")
    server = server_factory(device_config=str(config))

    async def scenario() -> None:
        await connect_device(server, "dev-1", supported_features=["gui"])
        await connect_device(server, "dev-2")
        async with api(server) as http:
            info = (await http.get("/api/devices/dev-1")).json()["system_info"]
            assert info["tags"] == ["lab"]

            config.write_text(
                "devices:\n  dev-1:\n    tags: [lab, gpu]\n    additional_features: [cuda]\n"
                "  dev-9:\n    tags: [spare]\n",
                encoding="utf-8",
            )
            response = await http.post("/api/devices/reload-config")
            assert response.status_code == 200
            assert response.json() == {"status": "reloaded", "entries": 2, "devices_changed": 1}
            info = (await http.get("/api/devices/dev-1")).json()["system_info"]
            assert info["tags"] == ["lab", "gpu"]
            assert info["supported_features"] == ["gui", "cuda"]
            selected = await http.get("/api/devices/select", params={"tags": "gpu"})
            assert selected.json()["device_id"] == "dev-1"

            config.write_text("devices: [not, a, mapping]\n", encoding="utf-8")
            response = await http.post("/api/devices/reload-config")
            assert response.status_code == 400
            assert "devices" in response.json()["detail"]
            info = (await http.get("/api/devices/dev-1")).json()["system_info"]
            assert info["tags"] == ["lab", "gpu"]

    run(scenario())


def test_reload_config_without_a_file(server: ServerThread) -> None:
    """Without a device config file, a reload changes nothing."""
    with server.http() as http:
        response = http.post("/api/devices/reload-config")
    assert response.status_code == 200
    assert response.json() == {"status": "reloaded", "entries": 0, "devices_changed": 0}


# -- stats and sessions ----------------------------------------------------------------------


def test_stats_has_seed_counts_and_sessions_by_state(server: ServerThread) -> None:
    """`/api/stats`: the seed's counts, the live session count and SQL sessions by state."""

    async def scenario() -> dict[str, Any]:
        device = await connect_device(server, "dev-1", platform="linux")
        owner = await connect_constellation(server, "n@dev-1", "dev-1")
        for session_id, request in (("n@t1", PLAN), ("n@t2", "Open Excel, please.")):
            await owner.send(
                type="task",
                status="continue",
                client_type="constellation",
                client_id="n@dev-1",
                target_id="dev-1",
                session_id=session_id,
                request=request,
            )
        await device.recv_type("command")
        end = await owner.recv_type("task_end")
        assert (end["session_id"], end["error"]) == ("n@t2", NO_RUNNER_ERROR)
        async with api(server) as http:
            return (await http.get("/api/stats")).json()

    body = run(scenario())
    assert (body["total"], body["device_clients"], body["constellation_clients"]) == (2, 1, 1)
    assert body["devices"] == {"ids": ["dev-1"], "count": 1, "platforms": {"linux": 1}}
    assert body["constellations"] == {"ids": ["n@dev-1"], "count": 1}
    assert body["active_sessions"] == 1
    assert body["sessions_by_state"] == {"running": 1, "failed": 1}
    assert body["store"]["degraded"] is False
    assert body["store"]["writes_committed"] > 0


class TestSessions:
    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({}, ["s5", "s4", "s3", "s2", "s1"]),
            ({"state": "completed"}, ["s5", "s1"]),
            ({"state": ["completed", "failed"]}, ["s5", "s2", "s1"]),
            ({"state": "running"}, ["s3"]),
            ({"device_id": "dev-2"}, ["s4", "s3"]),
            ({"constellation_id": "c-a"}, ["s5", "s4", "s1"]),
            ({"constellation_id": "c-a", "device_id": "dev-1"}, ["s5", "s1"]),
            ({"since": (T0 + timedelta(hours=2)).isoformat()}, ["s5", "s4", "s3"]),
            ({"until": (T0 + timedelta(hours=2)).isoformat()}, ["s2", "s1"]),
            (
                {
                    "since": (T0 + timedelta(hours=1)).isoformat(),
                    "until": (T0 + timedelta(hours=3)).isoformat(),
                },
                ["s3", "s2"],
            ),
            ({"since": "2026-01-01T03:00:00+01:00"}, ["s5", "s4", "s3"]),
            ({"since": "2026-01-01T02:00:00Z"}, ["s5", "s4", "s3"]),
            ({"device_id": "nobody"}, []),
        ],
        ids=[
            "all",
            "state",
            "states",
            "running",
            "device",
            "constellation",
            "constellation-and-device",
            "since",
            "until",
            "since-until",
            "since-offset",
            "since-z",
            "unknown-device",
        ],
    )
    def test_filters(
        self, server: ServerThread, params: dict[str, Any], expected: list[str]
    ) -> None:
        """`/api/sessions` filters by state, device, constellation and creation time."""
        seed_sessions(server)
        with server.http() as http:
            response = http.get("/api/sessions", params=params)
        assert response.status_code == 200, response.text
        assert ids(response.json()) == expected

    def test_pagination(self, server: ServerThread) -> None:
        """`limit`/`offset` page through newest first; `next_offset` is null on the last page."""
        seed_sessions(server)
        pages = []
        with server.http() as http:
            offset: int | None = 0
            while offset is not None:
                page = http.get("/api/sessions", params={"limit": 2, "offset": offset}).json()
                assert (page["limit"], page["offset"]) == (2, offset)
                pages.append(ids(page))
                offset = page["next_offset"]
        assert pages == [["s5", "s4"], ["s3", "s2"], ["s1"]]

    def test_items_carry_the_stored_fields(self, server: ServerThread) -> None:
        """Each item is the SQL row: ids, parties, state, result and times."""
        seed_sessions(server)
        with server.http() as http:
            item = http.get("/api/sessions", params={"limit": 1}).json()["items"][0]
        assert item == {
            "id": "run-s5",
            "session_id": "s5",
            "task_name": "task-s5",
            "request": "do it",
            "origin": "constellation",
            "constellation_id": "c-a",
            "device_id": "dev-1",
            "mode": "agent",
            "state": "completed",
            "reason": None,
            "result": {"session": "s5"},
            "error": None,
            "created_at": (T0 + timedelta(hours=4)).isoformat(),
            "started_at": (T0 + timedelta(hours=4)).isoformat(),
            "ended_at": (T0 + timedelta(hours=4, minutes=1)).isoformat(),
        }

    @pytest.mark.parametrize(
        "params",
        [
            {"state": "done"},
            {"limit": 0},
            {"limit": 1001},
            {"offset": -1},
            {"since": "yesterday"},
            {"since": "2026-01-01T00:00:00"},
        ],
        ids=["state", "limit-0", "limit-too-big", "offset", "since-garbage", "since-naive"],
    )
    def test_bad_parameters_are_422(self, server: ServerThread, params: dict[str, Any]) -> None:
        """Invalid filters are refused with 422 and a `detail`, never a server error."""
        with server.http() as http:
            response = http.get("/api/sessions", params=params)
        assert response.status_code == 422, response.text
        assert response.json()["detail"]

    def test_session_by_id(self, server: ServerThread) -> None:
        """`/api/sessions/{session_id}` is the newest run with that id; 404 when unknown."""
        seed_sessions(server)
        with server.http() as http:
            found = http.get("/api/sessions/s3")
            missing = http.get("/api/sessions/nope")
        assert found.status_code == 200
        assert (found.json()["id"], found.json()["state"]) == ("run-s3", "running")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "Session not found"}

    def test_odd_session_ids_round_trip(self, server: ServerThread) -> None:
        """A session id with `@`, `/` or non-ASCII characters is found (URL-encoded)."""
        store = server.app.state.store
        for session_id in ("nightly@task_3", "nightly@a/b", "ünï@t"):
            store.record_session_created(
                id=f"run-{len(session_id)}-{session_id.encode().hex()[:8]}",
                session_id=session_id,
                task_name=None,
                request=None,
                origin="constellation",
                constellation_id="nightly",
                device_id="dev-1",
                mode="agent",
                state=SessionState.RUNNING,
                at=T0,
            )
        server.flush()
        with server.http() as http:
            for session_id in ("nightly@task_3", "ünï@t", "nightly@a/b"):
                response = http.get(f"/api/sessions/{quote(session_id, safe='')}")
                assert response.status_code == 200, session_id
                assert response.json()["session_id"] == session_id
            assert http.get("/api/sessions/nightly@a").status_code == 404


# -- dispatch and task results ---------------------------------------------------------------


class TestDispatchRefusals:
    @pytest.mark.parametrize(
        ("body", "status", "detail"),
        [
            ({}, 400, "Empty task content"),
            ({"request": "", "client_id": "dev-1"}, 400, "Empty task content"),
            ({"request": None, "client_id": ""}, 400, "Empty task content"),
            ({"request": PLAN}, 400, "Empty client ID"),
            ({"request": PLAN, "client_id": ""}, 400, "Empty client ID"),
            ({"request": PLAN, "client_id": "ghost", "task_name": "../x"}, 400, BAD_NAME),
            ({"request": PLAN, "client_id": "dev-1", "task_name": ""}, 400, BAD_NAME),
            ({"request": PLAN, "client_id": "dev-1", "task_name": None}, 400, BAD_NAME),
            ({"request": PLAN, "client_id": "dev-1", "task_name": ".hidden"}, 400, BAD_NAME),
            ({"request": PLAN, "client_id": "dev-1", "task_name": "a b"}, 400, BAD_NAME),
            ({"request": PLAN, "client_id": "ghost"}, 404, "Client not online"),
            ({"request": PLAN, "client_id": "n@dev-1"}, 409, "Tasks can only be dispatched"),
        ],
        ids=[
            "no-request",
            "empty-request-first",
            "null-request-first",
            "no-client",
            "empty-client",
            "task-name-before-online-check",
            "empty-task-name",
            "null-task-name",
            "dot-task-name",
            "space-task-name",
            "offline",
            "constellation",
        ],
    )
    def test_refusal(
        self, server: ServerThread, body: dict[str, Any], status: int, detail: str
    ) -> None:
        """UFO's checks in UFO's order; a refused dispatch starts nothing and sends nothing."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "n@dev-1", "dev-1")
            async with api(server) as http:
                response = await http.post("/api/dispatch", json=body)
            assert response.status_code == status, response.text
            assert response.json()["detail"].startswith(detail)
            for client in (device, owner):
                await client.send(type="heartbeat", client_id=client.client_id)
                reply = await client.recv()  # the ack, with nothing queued before it
                assert (reply["type"], reply["session_id"]) == ("heartbeat", None)
            server.flush()
            assert read_sessions(server.app.state.store.engine) == []

        run(scenario())

    @pytest.mark.parametrize("body", ["[]", '"text"', "{not json"], ids=["list", "string", "bad"])
    def test_body_that_is_not_an_object_is_422(self, server: ServerThread, body: str) -> None:
        """A body that is not a JSON object is a validation error."""
        with server.http() as http:
            response = http.post(
                "/api/dispatch", content=body, headers={"Content-Type": "application/json"}
            )
        assert response.status_code == 422
        assert response.json()["detail"]


def test_dispatch_returns_the_session_that_runs(server: ServerThread) -> None:
    """The returned `session_id` is the one in the COMMANDs and in SQL, and it completes."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            response = await http.post(
                "/api/dispatch",
                json={"client_id": "dev-1", "request": PLAN, "task_name": "weekly-cleanup"},
            )
            assert response.status_code == 200
            body = response.json()
            session_id = body["session_id"]
            assert body == {
                "status": "dispatched",
                "task_name": "weekly-cleanup",
                "client_id": "dev-1",
                "session_id": session_id,
                "state": "running",
            }
            command = await device.recv()
            assert command["type"] == "command"
            assert (command["session_id"], command["task_name"]) == (session_id, "weekly-cleanup")
            assert [a["tool_name"] for a in command["actions"]] == ["echo"]
            await answer(device, command, "emptied")
            end = await device.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "completed",
                session_id,
            )
            row = (await http.get(f"/api/sessions/{session_id}")).json()
        assert (row["state"], row["origin"], row["device_id"]) == ("completed", "http", "dev-1")
        assert row["constellation_id"] is None
        assert row["task_name"] == "weekly-cleanup"
        assert row["request"] == PLAN
        assert row["result"] == end["result"]
        assert row["result"][0]["result"] == "emptied"

    run(scenario())


def test_dispatch_without_task_name_gets_a_generated_one(server: ServerThread) -> None:
    """Without `task_name` the server makes one (a UUID) and reports it."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            body = (
                await http.post("/api/dispatch", json={"client_id": "dev-1", "request": PLAN})
            ).json()
        command = await device.recv_type("command")
        assert command["task_name"] == body["task_name"]
        assert len(body["task_name"]) == 36

    run(scenario())


def test_dispatch_of_natural_language_fails_honestly(server: ServerThread) -> None:
    """Without an agent runner a natural-language dispatch ends `failed` with the reason."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            body = (
                await http.post(
                    "/api/dispatch", json={"client_id": "dev-1", "request": "Empty the bin."}
                )
            ).json()
            end = await device.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "failed",
                body["session_id"],
            )
            assert end["error"] == NO_RUNNER_ERROR
            row = (await http.get(f"/api/sessions/{body['session_id']}")).json()
        assert (row["state"], row["reason"]) == ("failed", "no_runner")
        assert row["error"] == NO_RUNNER_ERROR

    run(scenario())


def test_task_result_pending_then_done(server: ServerThread) -> None:
    """`/api/task_result/{name}`: pending while unknown or running, then done with the result."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            assert (await http.get("/api/task_result/weekly-cleanup")).json() == {
                "status": "pending"
            }
            dispatched = await http.post(
                "/api/dispatch",
                json={"client_id": "dev-1", "request": PLAN, "task_name": "weekly-cleanup"},
            )
            command = await device.recv_type("command")
            assert (await http.get("/api/task_result/weekly-cleanup")).json() == {
                "status": "pending"
            }
            await answer(device, command, "emptied")
            await device.recv_type("task_end")
            body = (await http.get("/api/task_result/weekly-cleanup")).json()
        assert body["status"] == "done"
        assert body["state"] == "completed"
        assert body["session_id"] == dispatched.json()["session_id"]
        assert body["result"][0]["result"] == "emptied"
        assert body["error"] is None

    run(scenario())


def test_task_result_is_served_from_sql(server_factory: Callable[..., ServerThread]) -> None:
    """A result stays available after the session left memory, even from a new server process."""
    first = server_factory()

    async def scenario() -> None:
        device = await connect_device(first, "dev-1")
        async with api(first) as http:
            await http.post(
                "/api/dispatch",
                json={"client_id": "dev-1", "request": PLAN, "task_name": "nightly"},
            )
        command = await device.recv_type("command")
        await answer(device, command, "kept")
        await device.recv_type("task_end")

    run(scenario())
    first.stop()
    second = server_factory()
    with second.http() as http:
        body = http.get("/api/task_result/nightly").json()
    assert (body["status"], body["state"]) == ("done", "completed")
    assert body["result"][0]["result"] == "kept"


def test_task_result_reports_the_newest_run_of_a_name(server: ServerThread) -> None:
    """Two runs with one task name: the answer follows the newest, pending while it runs."""

    async def scenario() -> None:
        device = await connect_device(server, "dev-1")
        async with api(server) as http:
            body = {"client_id": "dev-1", "request": PLAN, "task_name": "again"}
            await http.post("/api/dispatch", json=body)
            command = await device.recv_type("command")
            await answer(device, command, "first")
            await device.recv_type("task_end")
            assert (await http.get("/api/task_result/again")).json()["status"] == "done"
            await http.post("/api/dispatch", json=body)
            command = await device.recv_type("command")
            assert (await http.get("/api/task_result/again")).json() == {"status": "pending"}
            await answer(device, command, "second")
            await device.recv_type("task_end")
            result = (await http.get("/api/task_result/again")).json()
        assert result["result"][0]["result"] == "second"

    run(scenario())


# -- documentation and error shape -----------------------------------------------------------


def test_docs_and_openapi_are_reachable(server_factory: Callable[..., ServerThread]) -> None:
    """With `server.docs: public`, `/docs` serves the Swagger UI and `/openapi.json` lists every
    route (the default, `key`, is in tests/test_docs.py)."""
    server = server_factory(**{"server.docs": "public"})
    with server.http() as http:
        docs = http.get("/docs")
        schema = http.get("/openapi.json")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/healthz",
        "/api/health",
        "/api/clients",
        "/api/clients/{client_id}/connections",
        "/api/devices",
        "/api/devices/{device_id}",
        "/api/devices/select",
        "/api/devices/reload-config",
        "/api/stats",
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/dispatch",
        "/api/task_result/{task_name}",
    ):
        assert path in paths
    assert API_KEY not in schema.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nothing-here", 404),
        ("GET", "/nothing-here", 404),
        ("DELETE", "/api/health", 405),
        ("GET", "/api/dispatch", 405),
        ("GET", "/api/sessions?limit=abc", 422),
        ("GET", "/api/devices/nobody", 404),
    ],
)
def test_errors_are_json_with_a_detail(
    server: ServerThread, method: str, path: str, status: int
) -> None:
    """Every error answer is JSON with a `detail`."""
    with server.http() as http:
        response = http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]
