"""`database.enabled: false`: ccm with the live registry only (what the benchmarks compare
persistence against). Sessions relay as usual; history endpoints answer 503; nothing is stored."""

from __future__ import annotations

from pathlib import Path

from tests.server.support import AipClient, ServerThread, make_settings, run, track


def test_relay_works_without_a_database(tmp_path: Path) -> None:
    """A relayed task gets its ACK and TASK_END; health is fine, history is 503, no file made."""
    settings = make_settings(
        "sqlite:///unused.db", tmp_path / "data", **{"database.enabled": False}
    )
    server = ServerThread(settings).start()
    try:

        async def scenario() -> None:
            dev = track(await AipClient.connect(server.ws_url))
            assert (await dev.register_device("dev-1", relay=True))["status"] == "ok"
            con = track(await AipClient.connect(server.ws_url))
            assert (await con.register_constellation("c@dev-1", "dev-1"))["status"] == "ok"
            await con.send(
                type="task",
                status="continue",
                client_type="constellation",
                client_id="c@dev-1",
                target_id="dev-1",
                session_id="c@t1",
                task_name="t1",
                request="noop",
            )
            ack = await con.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "c@t1")
            task = await dev.recv_type("task")
            await dev.send(
                type="task_end",
                status="completed",
                client_id="dev-1",
                session_id=task["session_id"],
                metadata={"result": 42},
            )
            end = await con.recv_type("task_end")
            assert (end["status"], end["session_id"], end["result"]) == ("completed", "c@t1", 42)

        run(scenario())
        with server.http() as http:
            assert http.get("/api/health").json()["status"] == "healthy"
            assert http.get("/api/sessions").status_code == 503
        assert server.app.state.store is None
        assert not (tmp_path / "data" / "ccm.db").exists()
    finally:
        server.stop()
