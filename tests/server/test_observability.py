"""Metrics scraped and parsed with prometheus-client's own parser, structured logs, `ccm status`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from ccm.cli import app
from ccm.logs import (
    ConnectionChatter,
    ContextFilter,
    JsonFormatter,
    RedactTokens,
    TextFormatter,
    bound,
)
from tests.server.support import API_KEY, AipClient, ServerThread, run, track
from tests.support import wait_until

PLAN = json.dumps([{"tool_name": "echo", "parameters": {"x": 1}, "tool_type": "action"}])


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of a scrape as {(name, sorted labels): value}."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def _known_activity(server: ServerThread) -> None:
    """One device, one constellation, one tool-plan session, one malformed frame, both leave."""
    device = track(await AipClient.connect(server.ws_url))
    await device.register_device("obs-dev", platform="linux")
    constellation = track(await AipClient.connect(server.ws_url))
    await constellation.register_constellation("obs@obs-dev", "obs-dev")
    await constellation.send(
        type="task",
        status="continue",
        client_type="constellation",
        client_id="obs@obs-dev",
        target_id="obs-dev",
        session_id="obs@1",
        request=PLAN,
    )
    command = await device.recv_type("command")
    await device.send(
        type="command_results",
        status="continue",
        client_id="obs-dev",
        session_id="obs@1",
        prev_response_id=command["response_id"],
        action_results=[
            {"status": "success", "result": {"x": 1}, "call_id": command["actions"][0]["call_id"]}
        ],
    )
    await constellation.recv_type("task_end")
    await device.ws.send("{not json")
    await device.recv_type("error")
    await device.close()
    await constellation.close()


class TestMetrics:
    def test_metrics_count_known_activity(self, server: ServerThread) -> None:
        """Registrations, sessions, frames, protocol errors and disconnects match what happened."""
        run(_known_activity(server))
        with server.http() as http:

            def disconnects_counted() -> bool:
                samples = _samples(http.get("/metrics").text)
                return samples.get(("ccm_disconnects_total", (("reason", "closed"),))) == 2

            # Disconnect handling finishes after the close; it queues its writes before it counts.
            wait_until(disconnects_counted, what="both disconnects to be counted")
            server.flush()  # nothing is left for the store writer to do
            samples = _samples(http.get("/metrics").text)
        assert samples[("ccm_registrations_total", (("type", "device"),))] == 1
        assert samples[("ccm_registrations_total", (("type", "constellation"),))] == 1
        assert samples[("ccm_disconnects_total", (("reason", "closed"),))] == 2
        assert (
            samples[
                ("ccm_sessions_started_total", (("mode", "agent"), ("origin", "constellation")))
            ]
            == 1
        )
        assert samples[("ccm_sessions_ended_total", (("state", "completed"),))] == 1
        assert samples[("ccm_session_duration_seconds_count", (("mode", "agent"),))] == 1
        assert samples[("ccm_frames_in_total", (("type", "task"),))] == 1
        assert samples[("ccm_frames_in_total", (("type", "command_results"),))] == 1
        assert samples[("ccm_frames_out_total", (("type", "command"),))] == 1
        assert samples[("ccm_frames_out_total", (("type", "task_end"),))] == 2
        assert samples[("ccm_protocol_errors_total", (("kind", "malformed_json"),))] == 1
        assert samples[("ccm_live_sessions", ())] == 0
        assert samples[("ccm_store_queue_depth", ())] == 0
        assert samples[("ccm_store_batch_size_count", ())] >= 1

    def test_connected_clients_gauge_by_type_and_platform(self, server: ServerThread) -> None:
        """The connected-clients gauge is read from the registry at scrape time."""

        async def scenario() -> None:
            device = track(await AipClient.connect(server.ws_url))
            await device.register_device("gauge-dev", platform="Linux")
            with server.http() as http:
                samples = _samples(http.get("/metrics").text)
            key = ("ccm_connected_clients", (("platform", "linux"), ("type", "device")))
            assert samples[key] == 1

        run(scenario())

    def test_metrics_need_the_key(self, server: ServerThread) -> None:
        """/metrics refuses a missing or wrong key and accepts X-API-Key or a Bearer token."""
        import httpx

        with httpx.Client(base_url=server.http_url, timeout=10) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
            bearer = http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
            assert bearer.status_code == 200
            assert "ccm_registrations_total" in bearer.text


def _refuse_connections_of(engine: Any, client_id: str) -> None:
    """A trigger that makes the database itself refuse the connection rows of one client."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_one BEFORE INSERT ON connections "
                f"WHEN NEW.client_id = '{client_id}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_one() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.client_id = '{client_id}' THEN "
                "RAISE EXCEPTION 'refused by the test trigger'; END IF; RETURN NEW; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_one BEFORE INSERT ON connections "
                "FOR EACH ROW EXECUTE FUNCTION refuse_one()"
            )


class TestLostWrites:
    def test_a_write_the_database_refuses_is_counted_by_kind_in_health_and_metrics(
        self, server: ServerThread, caplog: Any
    ) -> None:
        """The database refuses one device's connection row. The other devices are stored; the
        loss shows in /api/health and /metrics by write kind and in an ERROR line. On a cluster
        node (PostgreSQL) the row is the registration's claim, so that device is refused with a
        reason; on SQLite it is accepted and its lost row reported the same way."""
        from tests.server.scenario import connection_rows, engine_of

        engine = engine_of(server)
        _refuse_connections_of(engine, "doomed-dev")

        async def scenario() -> dict[str, Any]:
            replies = {}
            for client_id in ("fine-dev-1", "doomed-dev", "fine-dev-2"):
                client = track(await AipClient.connect(server.ws_url))
                replies[client_id] = await client.register_device(client_id)
            return replies

        with caplog.at_level(logging.ERROR, logger="ccm.store.writer"):
            replies = run(scenario())
            with server.http() as http:
                wait_until(
                    lambda: http.get("/api/health").json()["database"]["writes_lost"],
                    10,
                    "the lost write counted",
                )
                health = http.get("/api/health").json()["database"]
                metrics = _samples(http.get("/metrics").text)
        doomed = replies.pop("doomed-dev")
        assert [r["status"] for r in replies.values()] == ["ok", "ok"]
        if engine.dialect.name == "postgresql":
            assert doomed["status"] == "error"
            assert "database refused to store this registration" in doomed["error"]
        else:
            assert doomed["status"] == "ok"
        [(kind, count)] = health["writes_lost"].items()
        assert count == 1
        assert "doomed-dev" in health["last_lost_write"]
        assert metrics[("ccm_store_writes_lost_total", (("kind", kind),))] == 1
        assert any("doomed-dev" in r.getMessage() for r in caplog.records)
        wait_until(lambda: connection_rows(server, "fine-dev-2"), 10, "the others stored")
        assert connection_rows(server, "doomed-dev") == []


class TestLogs:
    def _render(self, formatter: logging.Formatter, emit: Any) -> str:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
        handler.addFilter(RedactTokens())
        log = logging.getLogger("ccm.test.logs")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            emit(log)
        finally:
            log.removeHandler(handler)
        return stream.getvalue()

    def test_json_lines_carry_bound_ids(self) -> None:
        """A JSON log line has the message and the ids bound for the current task."""

        def emit(log: logging.Logger) -> None:
            with bound(client_id="dev-1", session_id="s@1"):
                log.info("session ended state=%s", "completed")

        line = json.loads(self._render(JsonFormatter(), emit))
        assert line["message"] == "session ended state=completed"
        assert (line["client_id"], line["session_id"], line["level"]) == ("dev-1", "s@1", "INFO")

    def test_bound_ids_do_not_leak_after_the_block(self) -> None:
        """Fields bound with `bound()` are gone once the block ends."""

        def emit(log: logging.Logger) -> None:
            with bound(session_id="s@2"):
                pass
            log.info("later")

        line = json.loads(self._render(JsonFormatter(), emit))
        assert "session_id" not in line

    def test_text_lines_redact_tokens(self) -> None:
        """A WebSocket URL with its token is logged without the key, in text format too."""

        def emit(log: logging.Logger) -> None:
            log.info('"WebSocket %s" accepted', "/ws?token=super-secret-key")

        text = self._render(TextFormatter(), emit)
        assert "super-secret-key" not in text
        assert '"WebSocket /ws?[query hidden]" accepted' in text

    def test_uvicorn_connection_chatter_is_dropped_at_info_only(self) -> None:
        """uvicorn's per-WebSocket INFO lines go (ccm logs its own per client); its other
        lines, and everything at WARNING or above, stay."""
        chatter = ConnectionChatter()

        def record(level: int, msg: str, *args: object) -> logging.LogRecord:
            return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, args, None)

        dropped = [
            record(logging.INFO, "connection open"),
            record(logging.INFO, "connection closed"),
            record(logging.INFO, '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/ws"),
        ]
        kept = [
            record(logging.INFO, "Uvicorn running on %s://%s:%d", "http", "127.0.0.1", 8000),
            record(logging.INFO, '%s - "WebSocket %s" 403', "127.0.0.1:5", "/ws"),
            record(logging.WARNING, "connection closed"),
        ]
        assert [chatter.filter(r) for r in dropped] == [False, False, False]
        assert [chatter.filter(r) for r in kept] == [True, True, True]

    def test_text_time_matches_the_stdlib_form_across_seconds(self) -> None:
        """The per-second cache of formatTime gives what logging.Formatter gives, also when
        records cross a second boundary or arrive out of order."""
        ours, stdlib = TextFormatter(), logging.Formatter()
        for created in (
            1_700_000_000.001,
            1_700_000_000.999,
            1_700_000_001.0,
            1_700_000_000.5,
            1_764_460_800.123,
        ):
            record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
            record.created, record.msecs = created, (created - int(created)) * 1000
            assert ours.formatTime(record) == stdlib.formatTime(record), created


class TestStatus:
    def test_status_summarises_a_running_server(self, server: ServerThread) -> None:
        """`ccm status --json` reports health, counts and the connected clients."""

        async def scenario() -> Any:
            device = track(await AipClient.connect(server.ws_url))
            await device.register_device("status-dev")
            result = await asyncio.to_thread(
                CliRunner().invoke,
                app,
                ["status", "--url", server.http_url, "--api-key", API_KEY, "--json"],
            )
            table = await asyncio.to_thread(
                CliRunner().invoke,
                app,
                ["status", "--url", server.http_url, "--api-key", API_KEY],
                env={"COLUMNS": "200"},
            )
            return result, table

        result, table = run(scenario())
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["health"]["status"] == "healthy"
        assert data["stats"]["device_clients"] == 1
        assert [c["client_id"] for c in data["clients"]] == ["status-dev"]
        assert table.exit_code == 0, table.output
        assert "status-dev" in table.output

    def test_status_with_a_wrong_key_says_what_to_check(self, server: ServerThread) -> None:
        """A refused key is one clear error, not a traceback."""
        result = CliRunner().invoke(
            app, ["status", "--url", server.http_url, "--api-key", "wrong-key"]
        )
        assert result.exit_code != 0
        assert "refused the API key" in str(result.exception)
