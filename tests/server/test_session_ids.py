"""Session ids on a real server: a running session's id cannot be started again, joined or
replayed by anyone, its owner included; once the session has ended the id may run again as a new
row, and its old result never reaches the new run."""

from __future__ import annotations

import json

import httpx

from tests.server.scenario import (
    ODD_SESSION_ID,
    PLAN,
    answer,
    assert_full_frame,
    assert_ok_frame,
    assert_quiet,
    connect_constellation,
    connect_device,
    constellation,
    device,
    expect_refused_task,
    one_session,
    send_task,
    session_rows,
    sessions_in_sql,
)
from tests.server.support import API_KEY, ServerThread, run

# -- refusals -------------------------------------------------------------------------------------


def test_task_with_running_session_id_is_refused(server: ServerThread) -> None:
    """A second TASK naming a running session gets ERROR + task_end failed; the first runs on."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "First.")
        assert_ok_frame(await con.recv(), ODD_SESSION_ID)
        await dev.recv()  # the task
        await send_task(con, "lab-pc-07", ODD_SESSION_ID, "Second.")
        error = await con.recv()
        assert_full_frame(error)
        assert (error["type"], error["status"], error["session_id"]) == ("error", "error", None)
        assert "already running" in error["error"]
        refused = await con.recv()
        assert (refused["type"], refused["status"]) == ("task_end", "failed")
        assert (refused["session_id"], refused["error"], refused["result"]) == (
            ODD_SESSION_ID,
            error["error"],
            None,
        )
        await dev.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-07",
            session_id=ODD_SESSION_ID,
            metadata={"result": "first done"},
        )
        end = await con.recv()
        assert (end["status"], end["session_id"], end["result"]) == (
            "completed",
            ODD_SESSION_ID,
            "first done",
        )

    run(scenario())
    row = one_session(server, ODD_SESSION_ID)  # the refused TASK left no row
    assert (row.state, row.request, row.result) == ("completed", "First.", "first done")


def test_task_with_session_id_of_another_owner_is_refused(server: ServerThread) -> None:
    """Another constellation naming a live session is refused; only it is told, the owner's runs."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        owner = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        intruder = await constellation(server, "other@lab-pc-07", "lab-pc-07")
        await send_task(owner, "lab-pc-07", "nightly@task_3", "Mine.")
        await owner.recv()  # ACK
        await dev.recv()  # the task
        await send_task(intruder, "lab-pc-07", "nightly@task_3", "Steal.")
        error, refused_end = await intruder.recv(), await intruder.recv()
        assert error["type"] == "error"
        assert error["error"] == "session_id 'nightly@task_3' is owned by another client"
        assert (refused_end["type"], refused_end["status"], refused_end["result"]) == (
            "task_end",
            "failed",
            None,
        )
        await dev.send(
            type="task_end",
            status="completed",
            client_id="lab-pc-07",
            session_id="nightly@task_3",
            metadata={"result": "secret"},
        )
        assert (await owner.recv())["result"] == "secret"
        # The intruder gets nothing more: its next frame is the ack of its own heartbeat.
        await intruder.send(type="heartbeat", client_id="other@lab-pc-07")
        assert_ok_frame(await intruder.recv())

    run(scenario())
    [row] = session_rows(server, "nightly@task_3")
    assert (row.constellation_id, row.state) == ("nightly@lab-pc-07", "completed")


def test_finished_session_id_may_run_again_as_a_new_row(server: ServerThread) -> None:
    """Once a session has ended its id may be sent again: a second run, a second row."""

    async def scenario() -> None:
        dev = await device(server, "lab-pc-07", relay=True)
        con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
        ends = []
        for outcome in ("first", "second"):
            await send_task(con, "lab-pc-07", ODD_SESSION_ID, outcome)
            assert_ok_frame(await con.recv(), ODD_SESSION_ID)
            assert (await dev.recv())["user_request"] == outcome
            await dev.send(
                type="task_end",
                status="completed",
                client_id="lab-pc-07",
                session_id=ODD_SESSION_ID,
                metadata={"result": outcome},
            )
            ends.append(await con.recv())
            await dev.recv()  # the copy
        assert [e["result"] for e in ends] == ["first", "second"]

    run(scenario())
    rows = session_rows(server, ODD_SESSION_ID)
    assert sorted((r.request, r.state, r.result) for r in rows) == [
        ("first", "completed", "first"),
        ("second", "completed", "second"),
    ]
    assert rows[0].id != rows[1].id


# -- 6.5 session ownership and id reuse ------------------------------------------------------


class TestSessionOwnership:
    def test_live_session_of_another_client_cannot_be_joined_or_replayed(
        self, server: ServerThread
    ) -> None:
        """B's TASK with A's running session id is refused: no ACK, none of A's results; after A's
        session ended B may reuse the id for a new run and never sees A's old result."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            a = await connect_constellation(server, "a@dev-1", "dev-1")
            b = await connect_constellation(server, "b@dev-1", "dev-1")
            await send_task(a, target_id="dev-1", session_id="shared@task_1")
            ack = await a.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "shared@task_1")
            command = await device.recv_type("command")

            await send_task(b, target_id="dev-1", session_id="shared@task_1")
            await expect_refused_task(
                b, "shared@task_1", "session_id 'shared@task_1' is owned by another client"
            )
            await assert_quiet(b, device)
            # A's bookkeeping is untouched by the refusal.
            assert server.registry.get_constellation_sessions("a@dev-1") == ["shared@task_1"]
            assert server.registry.get_device_sessions("dev-1") == ["shared@task_1"]
            assert server.registry.get_constellation_sessions("b@dev-1") == []

            await answer(device, command, "a-secret")
            end_a = await a.recv_type("task_end")
            assert (end_a["status"], end_a["result"][0]["result"]) == ("completed", "a-secret")
            await assert_quiet(b)
            (first,) = await sessions_in_sql(server, session_id="shared@task_1")
            assert (first.constellation_id, first.state) == ("a@dev-1", "completed")

            # The id is free again: B's reuse is a new run with its own row and result.
            await send_task(b, target_id="dev-1", session_id="shared@task_1")
            ack = await b.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "shared@task_1")
            command = await device.recv_type("command")
            await answer(device, command, "b-result")
            end_b = await b.recv_type("task_end")
            assert end_b["result"][0]["result"] == "b-result"
            assert "a-secret" not in json.dumps(end_b)
            await assert_quiet(a, b)
            rows = await sessions_in_sql(server, session_id="shared@task_1")
            assert len(rows) == 2
            assert rows[0].id != rows[1].id
            assert {(r.constellation_id, r.state) for r in rows} == {
                ("a@dev-1", "completed"),
                ("b@dev-1", "completed"),
            }
            newest = next(r for r in rows if r.constellation_id == "b@dev-1")
            assert newest.result[0]["result"] == "b-result"

        run(scenario())

    def test_owner_cannot_start_its_running_session_twice(self, server: ServerThread) -> None:
        """A second TASK with the owner's own running session id is refused; the run goes on."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            a = await connect_constellation(server, "a@dev-1", "dev-1")
            await send_task(a, target_id="dev-1", session_id="a@task_1")
            await a.recv()
            command = await device.recv_type("command")
            await send_task(a, target_id="dev-1", session_id="a@task_1")
            await expect_refused_task(a, "a@task_1", "already running")
            await assert_quiet(device)
            assert len(await sessions_in_sql(server, session_id="a@task_1")) == 1

            await answer(device, command, "once")
            end = await a.recv_type("task_end")
            assert (end["status"], end["result"][0]["result"]) == ("completed", "once")

        run(scenario())

    def test_a_device_cannot_claim_a_constellation_session(self, server: ServerThread) -> None:
        """A device's own TASK naming a constellation's running session id is refused."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            owner = await connect_constellation(server, "a@dev-1", "dev-1")
            await send_task(owner, target_id="dev-1", session_id="a@task_1")
            await owner.recv()
            command = await device.recv_type("command")
            await send_task(device, target_id=None, session_id="a@task_1", client_type="device")
            await expect_refused_task(device, "a@task_1", "owned by another client")
            await assert_quiet(owner)
            (row,) = await sessions_in_sql(server, session_id="a@task_1")
            assert (row.constellation_id, row.state) == ("a@dev-1", "running")
            await answer(device, command, "for a")
            end = await owner.recv_type("task_end")
            assert end["result"][0]["result"] == "for a"

        run(scenario())

    def test_an_http_dispatched_session_cannot_be_claimed(self, server: ServerThread) -> None:
        """A session without a constellation owner (HTTP dispatch) is refused to a constellation."""

        async def scenario() -> None:
            device = await connect_device(server, "dev-1")
            c = await connect_constellation(server, "c@dev-1", "dev-1")
            async with httpx.AsyncClient(
                base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=10
            ) as http:
                response = await http.post(
                    "/api/dispatch", json={"client_id": "dev-1", "request": PLAN}
                )
            session_id = response.json()["session_id"]
            command = await device.recv_type("command")
            await send_task(c, target_id="dev-1", session_id=session_id)
            await expect_refused_task(c, session_id, "owned by another client")
            await answer(device, command, "for the dispatcher")
            end = await device.recv_type("task_end")
            assert end["session_id"] == session_id
            await assert_quiet(c)

        run(scenario())
