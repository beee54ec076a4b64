"""What real UFO clients trip on, stale and flapping clients, and values at the schema's limits:
each is answered the way a client can act on, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from ccm.store.models import bans
from tests.reliability.support import RawPool
from tests.server.scenario import (
    assert_quiet,
    connection_rows,
    constellation,
    device,
    engine_of,
    expect_error,
    one_session,
    send_task,
)
from tests.server.support import API_KEY, AipClient, ServerThread, run, track
from tests.support import wait_until

CALL = {"tool_name": "add", "parameters": {"a": 2, "b": 3}, "tool_type": "action"}


def _metric(server: ServerThread, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.http_url}/metrics", headers={"X-API-Key": API_KEY}, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def _agent_pair(server: ServerThread, name: str) -> tuple[AipClient, AipClient]:
    dev = await device(server, f"{name}-dev")
    con = await constellation(server, f"{name}@{name}-dev", f"{name}-dev")
    return dev, con


class TestGalaxyTasks:
    def test_a_plan_inside_galaxys_prose_is_found_and_run(self, server: ServerThread) -> None:
        """Galaxy's TaskStar sends `Task Description: ...\\nTips for Completion: ...`; a JSON
        plan in the description runs as a plan."""
        prose = (
            f"Task Description: add two numbers with this plan {json.dumps([CALL])}\n"
            "Tips for Completion: check the [result] before you finish."
        )

        async def scenario() -> dict[str, Any]:
            dev, con = await _agent_pair(server, "g1")
            await send_task(con, "g1-dev", "g1-s", prose)
            command = await dev.recv_type("command")
            [action] = command["actions"]
            assert action["tool_name"] == "add"
            await dev.send(
                type="command_results",
                client_id="g1-dev",
                session_id="g1-s",
                prev_response_id=command["response_id"],
                status="continue",
                action_results=[{"status": "success", "result": 5, "call_id": action["call_id"]}],
            )
            return await con.recv_type("task_end")

        end = run(scenario())
        assert end["status"] == "completed"
        assert end["result"][0]["result"] == 5

    def test_prose_without_a_plan_still_says_a_runner_is_needed(self, server: ServerThread) -> None:
        """No plan in the text: the task fails at once, saying natural language needs a runner."""

        async def scenario() -> dict[str, Any]:
            _dev, con = await _agent_pair(server, "g2")
            prose = "Task Description: open [Excel] and sum column {B}\nTips for Completion: none"
            await send_task(con, "g2-dev", "g2-s", prose)
            return await con.recv_type("task_end")

        end = run(scenario())
        assert end["status"] == "failed"
        assert "natural-language" in end["error"]

    def test_a_plan_may_ask_for_a_shorter_command_timeout(self, server: ServerThread) -> None:
        """A COMMAND for a tool the device lacks is never answered: a plan's `command_timeout`
        ends the session after that many seconds instead of server.command_timeout."""
        request = json.dumps({"command_timeout": 0.5, "tools": [CALL]})

        async def scenario() -> dict[str, Any]:
            dev, con = await _agent_pair(server, "g3")
            await send_task(con, "g3-dev", "g3-s", request)
            await dev.recv_type("command")  # never answered
            return await con.recv_type("task_end", timeout=10)

        end = run(scenario())
        assert end["status"] == "failed"
        assert "within 0.5 s" in end["error"]


class TestLateAndOversizedAnswers:
    def test_a_late_command_results_is_dropped_quietly(self, server: ServerThread) -> None:
        """COMMAND_RESULTS after the session ended: no ERROR frame (UFO logs it as a server
        error), counted in ccm_late_frames_total."""
        request = json.dumps({"command_timeout": 0.3, "tools": [CALL]})

        async def scenario() -> None:
            dev, con = await _agent_pair(server, "l1")
            await send_task(con, "l1-dev", "l1-s", request)
            command = await dev.recv_type("command")
            assert (await con.recv_type("task_end"))["status"] == "failed"
            assert (await dev.recv_type("task_end"))["status"] == "failed"  # the device's copy
            await dev.send(
                type="command_results",
                client_id="l1-dev",
                session_id="l1-s",
                prev_response_id=command["response_id"],
                status="continue",
                action_results=[{"status": "success", "result": 5}],
            )
            await assert_quiet(dev)

        run(scenario())
        assert _metric(server, "ccm_late_frames_total", type="command_results") == 1

    def test_a_result_over_the_frame_limit_names_the_limit(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """A relay device whose result is over server.max_frame_bytes is closed (1009); its
        session fails as `frame_too_large` and the constellation is told the limit."""
        server = server_factory(**{"server.max_frame_bytes": 4096})

        async def scenario() -> dict[str, Any]:
            dev = await device(server, "o1-dev", relay=True)
            con = await constellation(server, "o1@o1-dev", "o1-dev")
            await send_task(con, "o1-dev", "o1-s", "big")
            await dev.recv_type("task")
            await dev.send(
                type="task_end",
                client_id="o1-dev",
                session_id="o1-s",
                status="completed",
                metadata={"result": "x" * 10_000},
            )
            return await con.recv_type("task_end")

        end = run(scenario())
        assert end["status"] == "failed"
        assert "4096-byte limit" in end["error"]
        session = one_session(server, "o1-s")
        assert (session.state, session.reason) == ("failed", "frame_too_large")


class TestLiveness:
    def test_a_client_that_answers_pings_outlives_the_heartbeat_limit(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """A stock UFO device heartbeats every 120 s; with a shorter heartbeat_interval it stays
        as long as it answers WebSocket pings, while a client that answers nothing expires."""
        server = server_factory(
            **{"server.heartbeat_interval": 0.5, "server.ws_ping_interval": 0.2}
        )

        async def scenario() -> tuple[bool, int | None]:
            quiet = await device(server, "p1-dev")  # websockets answers pings by itself
            async with RawPool(server.port) as pool:
                mute = await pool.connect(token=API_KEY)  # answers pings only while it reads
                assert (await mute.register("p2-dev"))["status"] == "ok"
                await asyncio.to_thread(
                    wait_until,
                    lambda: not server.registry.is_online("p2-dev"),
                    10,
                    "the mute client expired",
                )
            return server.registry.is_online("p1-dev"), quiet.ws.close_code

        alive, code = run(scenario())
        assert alive
        assert code is None
        # Expired by the heartbeat limit, or by uvicorn's unanswered ping (whichever came first).
        reason = connection_rows(server, "p2-dev")[0].disconnect_reason
        assert reason in {"heartbeat_timeout", "connection_lost"}

    def test_a_stale_connection_gives_way_to_a_newcomer(self, server: ServerThread) -> None:
        """Under `reject`, a newcomer for a live id is accepted if the old connection does not
        answer a ping (a half-open socket of a restarted device), which closes as `stale`."""

        async def scenario() -> dict[str, Any]:
            async with RawPool(server.port) as pool:
                old = await pool.connect(token=API_KEY)
                assert (await old.register("s1-dev"))["status"] == "ok"
                newcomer = track(await AipClient.connect(server.ws_url))
                return await newcomer.register_device("s1-dev")

        reply = run(scenario())
        assert reply["status"] == "ok", reply
        old, _new = sorted(connection_rows(server, "s1-dev"), key=lambda r: r.connected_at)
        assert old.disconnect_reason == "stale"

    def test_a_registered_connection_keeps_no_handshake_and_still_answers_pings(
        self, server: ServerThread
    ) -> None:
        """uvicorn's copy of the handshake (request and response headers) is dropped once the
        accept is out, and the connection still answers the probe that stale checks use."""
        from ccm.server import ws_probe

        async def scenario() -> tuple[Any, bool | None]:
            await device(server, "h1-dev")
            info = server.registry.get_client_info("h1-dev")
            assert info is not None
            protocol = ws_probe._protocol(info.websocket)
            answered = await ws_probe.probe(info.websocket, 5)
            return protocol, answered

        protocol, answered = run(scenario())
        assert protocol is not None, "uvicorn's protocol object is out of reach"
        assert (protocol.request, protocol.response) == (None, None)
        assert answered is True

    def test_a_live_connection_keeps_its_id(self, server: ServerThread) -> None:
        """The old connection answers its ping: the newcomer is refused, as UFO does."""

        async def scenario() -> None:
            await device(server, "s2-dev")
            newcomer = track(await AipClient.connect(server.ws_url))
            await newcomer.send(
                type="register",
                client_id="s2-dev",
                metadata={"platform": "linux", "system_info": {}},
            )
            await expect_error(newcomer, "already registered")

        run(scenario())


class TestFlapping:
    def test_a_client_id_that_connects_too_often_is_refused_until_a_time(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """Past flapping.max_connects in the window, the id is refused with the time the ban
        ends; the ban is a row in `bans` and counted in /metrics."""
        server = server_factory(**{"flapping.max_connects": 3, "flapping.ban": 60})

        async def scenario() -> dict[str, Any]:
            for _ in range(3):
                client = await AipClient.connect(server.ws_url)
                assert (await client.register_device("f1-dev"))["status"] == "ok"
                await client.close()
            fourth = track(await AipClient.connect(server.ws_url))
            return await fourth.register_device("f1-dev")

        reply = run(scenario())
        assert reply["type"] == "error"
        assert "refused until" in reply["error"]
        server.flush()
        with engine_of(server).connect() as conn:
            [ban] = conn.execute(select(bans)).all()
        assert (ban.kind, ban.subject, ban.connects) == ("client_id", "f1-dev", 4)
        assert _metric(server, "ccm_flapping_bans_total", kind="client_id") == 1

    def test_an_address_that_connects_too_often_is_refused(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """Past flapping.max_connects_per_address, a non-exempt address is refused at once."""
        server = server_factory(
            **{"flapping.max_connects_per_address": 2, "flapping.exempt_addresses": []}
        )

        async def scenario() -> dict[str, Any]:
            for i in range(2):
                client = await AipClient.connect(server.ws_url)
                assert (await client.register_device(f"a{i}-dev"))["status"] == "ok"
                await client.close()
            third = track(await AipClient.connect(server.ws_url))
            return await third.recv()

        reply = run(scenario())
        assert reply["type"] == "error"
        assert "address '127.0.0.1'" in reply["error"]


class TestSchemaLimits:
    def test_a_platform_longer_than_its_column_is_refused(self, server: ServerThread) -> None:
        """metadata.platform over clients.platform's 64 characters: an ERROR naming the limit,
        not an accepted device whose rows the database drops."""

        async def scenario() -> None:
            client = track(await AipClient.connect(server.ws_url))
            await client.send(type="register", client_id="l-dev", metadata={"platform": "p" * 65})
            await expect_error(client, "longer than 64 characters")

        run(scenario())
        assert connection_rows(server, "l-dev") == []

    def test_a_task_name_longer_than_its_column_is_refused(self, server: ServerThread) -> None:
        """task_name over 255 characters: the task is refused naming the limit."""

        async def scenario() -> dict[str, Any]:
            _dev, con = await _agent_pair(server, "t1")
            await send_task(con, "t1-dev", "t1-s", "[]", task_name="n" * 256)
            return await con.recv_type("task_end")

        end = run(scenario())
        assert end["status"] == "failed"
        assert "longer than 255 characters" in end["error"]
