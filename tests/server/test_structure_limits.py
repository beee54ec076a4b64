"""Structure limits: frames nested deeper than `limits.max_json_depth` are refused at decode with
an ERROR naming the limit, oversized registration metadata and system info are refused naming
their limits, and every HTTP route answers what is already stored, however deeply nested, with a
200 (too-deep parts shown as TOO_DEEP)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websockets

from ccm.config import LimitsSettings
from ccm.domain import SessionState
from ccm.protocol import (
    CLOSE_INVALID_PAYLOAD,
    DEFAULT_MAX_JSON_DEPTH,
    ClientMessage,
    FrameError,
    decode_client_message,
    exceeds_depth,
    register_refusal,
)
from ccm.server.answers import SHOWN_DEPTH, TOO_DEEP
from tests.server.support import API_KEY, AipClient, ServerThread, frame, run, track

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def nested_objects(depth: int, leaf: Any = 1) -> Any:
    """`depth` objects inside each other: {"k": {"k": ... leaf}}."""
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_mixed(depth: int) -> Any:
    """Objects and arrays alternating, `depth` containers in all."""
    value: Any = "leaf"
    for level in range(depth):
        value = [value, 1] if level % 2 else {"a": value, "b": None}
    return value


def depth_of(value: Any) -> int:
    """Containers on the deepest path (iterative)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def ufo_register(client_id: str, system_info: Any = None) -> str:
    """A REGISTER as UFO's device client builds it (aip/protocol/registration.py with
    DeviceInfoProvider.collect_system_info)."""
    info = system_info or {
        "device_id": client_id,
        "platform": "windows",
        "os_version": "10.0.26100",
        "cpu_count": 16,
        "memory_total_gb": 31.7,
        "hostname": "LAB-PC-07",
        "ip_address": "10.0.0.7",
        "supported_features": ["gui", "cli", "browser", "file_system", "office", "windows_apps"],
        "platform_type": "computer",
        "schema_version": "1.0",
        "custom_metadata": {"location": {"site": "b1", "rack": {"row": 3, "slot": [1, 2]}}},
    }
    return frame(
        type="register",
        client_id=client_id,
        metadata={
            "platform": "windows",
            "registration_time": "2026-01-01T00:00:00+00:00",
            "system_info": info,
        },
    )


# -- decode ----------------------------------------------------------------------------------


class TestDepthAtDecode:
    @pytest.mark.parametrize(
        "text",
        [
            frame(
                type="register", metadata={"system_info": nested_objects(DEFAULT_MAX_JSON_DEPTH)}
            ),
            frame(type="register", metadata={"x": nested_mixed(DEFAULT_MAX_JSON_DEPTH)}),
            frame(type="task_end", metadata={"result": nested_mixed(300)}),
            '{"type":"register","status":"ok","metadata":' + "[" * 100_000 + "]" * 100_000 + "}",
        ],
        ids=["objects", "objects-and-arrays", "in-a-later-frame", "far-past-the-parser"],
    )
    def test_a_frame_nested_past_the_limit_is_refused_naming_it(self, text: str) -> None:
        """Any shape of nesting past the limit is a FrameError (1007) that names the setting."""
        with pytest.raises(FrameError) as caught:
            decode_client_message(text)
        assert caught.value.close_code == CLOSE_INVALID_PAYLOAD
        assert caught.value.kind == "too_deep"
        assert f"deeper than {DEFAULT_MAX_JSON_DEPTH} levels (limits.max_json_depth)" in (
            caught.value.reason
        )

    def test_a_frame_at_the_limit_is_accepted(self) -> None:
        """Exactly `max_json_depth` levels, the frame object included, still decode."""
        text = frame(type="register", client_id="d", metadata=nested_objects(255))
        assert depth_of(json.loads(text)) == DEFAULT_MAX_JSON_DEPTH
        assert decode_client_message(text).client_id == "d"

    def test_the_limit_is_the_callers(self) -> None:
        """`max_depth` is what the server passes from `limits.max_json_depth`."""
        text = frame(type="heartbeat", client_id="d", metadata=nested_objects(10))
        decode_client_message(text, max_depth=11)
        with pytest.raises(FrameError, match="deeper than 10 levels"):
            decode_client_message(text, max_depth=10)

    def test_brackets_inside_strings_do_not_count(self) -> None:
        """A shallow frame whose text holds thousands of brackets is accepted."""
        text = frame(type="heartbeat", client_id="d", error="{[" * 5000)
        assert decode_client_message(text, max_depth=8).error == "{[" * 5000

    def test_ufo_registration_is_far_inside_the_default(self) -> None:
        """What UFO's device client sends registers with room to spare."""
        msg = decode_client_message(ufo_register("lab-07"))
        assert msg.metadata is not None
        assert not exceeds_depth(json.loads(ufo_register("lab-07")), 8)

    def test_exceeds_depth_counts_containers_only(self) -> None:
        """`{}` is depth 1, scalars add nothing."""
        assert not exceeds_depth({"a": [1, "x", None]}, 2)
        assert exceeds_depth({"a": [[1]]}, 2)
        assert not exceeds_depth("text", 0)


class TestRegisterSizes:
    LIMITS = LimitsSettings(max_metadata_bytes=2048, max_system_info_bytes=4096)

    def message(self, **metadata: Any) -> ClientMessage:
        return ClientMessage.model_validate(
            {"type": "register", "status": "ok", "client_id": "d", "metadata": metadata}
        )

    def test_system_info_over_its_limit_is_refused_naming_it(self) -> None:
        """system_info larger than `limits.max_system_info_bytes` gets a text naming that key."""
        text = register_refusal(self.message(system_info={"blob": "x" * 5000}), self.LIMITS)
        assert text is not None
        assert "limits.max_system_info_bytes" in text
        assert "4096" in text

    def test_metadata_over_its_limit_is_refused_naming_it(self) -> None:
        """The rest of metadata has its own limit, measured without system_info."""
        text = register_refusal(self.message(notes=["y" * 100] * 30), self.LIMITS)
        assert text is not None
        assert "limits.max_metadata_bytes" in text

    def test_system_info_does_not_count_against_metadata(self) -> None:
        """3 KB of system info and a small rest pass both limits."""
        message = self.message(platform="linux", system_info={"blob": "x" * 3000})
        assert register_refusal(message, self.LIMITS) is None

    def test_multibyte_text_is_measured_in_bytes(self) -> None:
        """The limit is bytes of UTF-8, not characters."""
        message = self.message(system_info={"name": "日" * 1400})  # 4200 bytes, 1400 characters
        assert register_refusal(message, self.LIMITS) is not None

    def test_ufo_registration_passes_the_defaults(self) -> None:
        """UFO's REGISTER is far below both defaults."""
        message = decode_client_message(ufo_register("lab-07"))
        assert register_refusal(message, LimitsSettings()) is None


# -- the server ------------------------------------------------------------------------------


async def refused(server: ServerThread, text: str) -> tuple[dict[str, Any], int | None]:
    """Send `text` as the first frame; the ERROR frame and the close code."""
    client = track(await AipClient.connect(server.ws_url))
    await client.ws.send(text)
    error = await client.recv()
    with pytest.raises(websockets.ConnectionClosed):
        await client.recv()
    return error, client.ws.close_code


def test_deep_register_gets_an_error_naming_the_limit(server: ServerThread) -> None:
    """system_info nested 600 deep: an ERROR naming the limit and close 1007, not a dead
    connection, and the server goes on registering others."""
    text = frame(
        type="register",
        client_id="deep-dev",
        metadata={"platform": "linux", "system_info": nested_objects(600)},
    )

    async def scenario() -> tuple[dict[str, Any], int | None, dict[str, Any]]:
        error, code = await refused(server, text)
        other = track(await AipClient.connect(server.ws_url))
        return error, code, await other.register_device("after-deep")

    error, code, after = run(scenario())
    assert error["type"] == "error"
    assert "limits.max_json_depth" in error["error"]
    assert code == CLOSE_INVALID_PAYLOAD
    assert (after["type"], after["status"]) == ("heartbeat", "ok")
    assert not server.registry.is_online("deep-dev")


def test_deep_frame_after_registration_is_an_error_and_the_connection_stays(
    server: ServerThread,
) -> None:
    """A registered device sending a result nested past the limit gets an ERROR and keeps its
    connection (a heartbeat is still answered)."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        device = track(await AipClient.connect(server.ws_url))
        await device.register_device("deep-later")
        await device.send(
            type="command_results",
            client_id="deep-later",
            session_id="s",
            action_results=[{"status": "success", "result": nested_mixed(400)}],
        )
        error = await device.recv()
        await device.send(type="heartbeat", client_id="deep-later")
        return error, await device.recv()

    error, beat = run(scenario())
    assert "limits.max_json_depth" in error["error"]
    assert (beat["type"], beat["status"]) == ("heartbeat", "ok")


def test_oversized_system_info_is_refused_naming_the_limit(server_factory: Any) -> None:
    """With `limits.max_system_info_bytes` at 4 KB, a REGISTER with 8 KB of system info gets
    an ERROR naming that key and is not registered."""
    server = server_factory(**{"limits.max_system_info_bytes": 4096})
    text = frame(
        type="register",
        client_id="fat-dev",
        metadata={"platform": "linux", "system_info": {"blob": "z" * 8192}},
    )
    error, code = run(refused(server, text))
    assert "limits.max_system_info_bytes" in error["error"]
    assert code == 1008
    assert not server.registry.is_online("fat-dev")


def test_ufo_registration_is_accepted_by_the_server(server: ServerThread) -> None:
    """UFO's REGISTER, as its client builds it, is confirmed with the default limits."""

    async def scenario() -> dict[str, Any]:
        client = track(await AipClient.connect(server.ws_url))
        await client.ws.send(ufo_register("ufo-lab-07"))
        return await client.recv()

    reply = run(scenario())
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok")


# -- HTTP answers what is stored -------------------------------------------------------------


def store_deep_session(server: ServerThread, name: str, result: Any) -> None:
    """A finished session with `result`, written through the server's Store as a row written
    before the depth limit could have been (nothing checks depth on the way to SQL)."""
    store = server.app.state.store
    store.record_session_created(
        id=f"run-{name}",
        session_id=name,
        task_name=f"task-{name}",
        request="[]",
        origin="http",
        constellation_id=None,
        device_id="dev-x",
        mode="relay",
        state=SessionState.RUNNING,
        at=T0,
    )
    store.record_session_ended(
        id=f"run-{name}",
        state=SessionState.COMPLETED,
        reason=None,
        result=result,
        error=None,
        at=T0 + timedelta(seconds=1),
    )
    server.flush()


@pytest.mark.parametrize("depth", [300, 900])
def test_every_session_route_answers_a_deep_stored_result(server: ServerThread, depth: int) -> None:
    """Rows holding a result nested 300 or 900 deep: `/api/sessions`, `/api/sessions/{id}`,
    `/api/task_result/{name}` and the dashboard snapshot all answer 200."""
    store_deep_session(server, f"deep{depth}", nested_objects(depth, "bottom"))
    with server.http() as http:
        answers = {
            path: http.get(path)
            for path in (
                "/api/sessions",
                f"/api/sessions/deep{depth}",
                f"/api/task_result/task-deep{depth}",
                "/api/dashboard/snapshot",
            )
        }
    for path, response in answers.items():
        assert response.status_code == 200, (path, response.text[:200])
    assert answers["/api/sessions"].json()["items"][0]["session_id"] == f"deep{depth}"
    assert answers[f"/api/task_result/task-deep{depth}"].json()["status"] == "done"


def test_a_result_within_the_shown_depth_is_shown_whole(server: ServerThread) -> None:
    """300 levels are under SHOWN_DEPTH: the answer holds the value exactly as stored."""
    value = nested_objects(300, "bottom")
    store_deep_session(server, "whole", value)
    with server.http() as http:
        row = http.get("/api/sessions/whole").json()
    assert row["result"] == value


def test_a_result_past_the_shown_depth_shows_its_deep_part_as_too_deep(
    server: ServerThread,
) -> None:
    """900 levels: the answer keeps the first levels and replaces what lies below SHOWN_DEPTH
    by the TOO_DEEP text (the row in SQL is unchanged)."""
    store_deep_session(server, "clipped", nested_objects(900, "bottom"))
    with server.http() as http:
        document = json.loads(http.get("/api/sessions/clipped").text)
    node, depth = document, 1
    while isinstance(node, dict):
        node = node.get("k", node.get("result"))
        depth += 1
    assert node == TOO_DEEP
    assert depth == SHOWN_DEPTH + 1


def test_live_device_routes_answer_system_info_at_the_depth_ceiling(server_factory: Any) -> None:
    """With `limits.max_json_depth` at its ceiling (400), a device whose system info is nested
    as deep as that allows is served whole by `/api/devices/{id}` and `/api/devices/select`."""
    server = server_factory(**{"limits.max_json_depth": 400})
    info = {"device_id": "tall", "tags": ["tall"], "deep": nested_objects(397, "bottom")}
    text = frame(
        type="register", client_id="tall", metadata={"platform": "linux", "system_info": info}
    )
    assert depth_of(json.loads(text)) == 400

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        client = track(await AipClient.connect(server.ws_url))
        await client.ws.send(text)
        assert (await client.recv())["status"] == "ok"
        async with httpx.AsyncClient(
            base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
        ) as http:
            return (
                await http.get(f"/api/devices/{quote('tall')}"),
                await http.get("/api/devices/select", params={"tags": "tall"}),
            )

    detail, selected = run(scenario())
    assert detail.status_code == 200, detail.text[:200]
    assert detail.json()["system_info"]["deep"] == info["deep"]
    assert selected.status_code == 200, selected.text[:200]
    assert selected.json()["device_id"] == "tall"
