"""The dashboard's data without a browser: the per-minute series, the snapshot and the event
stream (auth, content, updates, shutdown) against a real server on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from ccm.config import Settings
from ccm.demo import run_constellation
from ccm.metrics import Metrics
from ccm.registry import ClientConnectionManager
from ccm.server.feed import DashboardFeed, MinuteSeries
from ccm.server.hub import Hub
from ccm.sessions import SessionManager
from tests.server.support import ServerThread
from tests.server.test_demo import DemoDevice

PLAN = json.dumps([{"tool_name": "add", "parameters": {"a": 2, "b": 3}}])
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each server-sent event; keepalive comments are skipped."""
    buffer = ""
    for chunk in response.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            if "event" in fields:
                yield fields["event"], json.loads(fields["data"])


def wait_for_snapshot(server: ServerThread, check: Any, timeout: float = 10) -> dict[str, Any]:
    """Poll the snapshot until `check(snapshot)` holds (the feed samples every ~2 s)."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while True:
            snapshot: dict[str, Any] = http.get("/api/dashboard/snapshot").json()
            if check(snapshot) or time.monotonic() > deadline:
                return snapshot
            time.sleep(0.1)


class TestMinuteSeries:
    def test_counts_sessions_per_minute_from_a_cumulative_counter(self) -> None:
        """Samples of a running total become per-minute deltas, split at minute boundaries."""
        series = MinuteSeries()
        for seconds, total in [(10, 0), (40, 2), (65, 3), (70, 3)]:
            series.record(
                T0 + timedelta(seconds=seconds), devices=1, sessions_started=total, disconnects={}
            )
        columns = series.columns(T0 + timedelta(minutes=1, seconds=30))
        assert columns["sessions_started"][-2:] == [2, 1]
        assert columns["minutes"][-1] == (T0 + timedelta(minutes=1)).isoformat()

    def test_keeps_the_peak_device_count_of_each_minute(self) -> None:
        """Devices per minute is the highest count sampled in that minute."""
        series = MinuteSeries()
        for seconds, devices in [(0, 1), (20, 3), (40, 2)]:
            series.record(
                T0 + timedelta(seconds=seconds), devices=devices, sessions_started=0, disconnects={}
            )
        assert series.columns(T0)["devices"][-1] == 3

    def test_counts_disconnects_by_reason(self) -> None:
        """Disconnect totals per reason become per-minute counts per reason."""
        series = MinuteSeries()
        series.record(T0, devices=0, sessions_started=0, disconnects={"closed": 1})
        series.record(
            T0 + timedelta(minutes=1),
            devices=0,
            sessions_started=0,
            disconnects={"closed": 1, "heartbeat_timeout": 2},
        )
        columns = series.columns(T0 + timedelta(minutes=1))
        assert columns["disconnects"]["closed"][-2:] == [1, 0]
        assert columns["disconnects"]["heartbeat_timeout"][-2:] == [0, 2]

    def test_holds_sixty_minutes_and_marks_unsampled_ones(self) -> None:
        """Only the last 60 minutes are kept; minutes never sampled have no device count."""
        series = MinuteSeries()
        for minute in range(0, 90, 2):
            series.record(
                T0 + timedelta(minutes=minute), devices=5, sessions_started=minute, disconnects={}
            )
        columns = series.columns(T0 + timedelta(minutes=88))
        assert len(columns["minutes"]) == len(columns["devices"]) == 60
        assert columns["minutes"][0] == (T0 + timedelta(minutes=29)).isoformat()
        assert columns["devices"][-3:] == [5, None, 5]
        assert columns["sessions_started"][-3:] == [2, 0, 2]


def test_snapshot_without_a_database_shows_live_state_and_says_why() -> None:
    """With no store (database.enabled false) the snapshot has live state and no history."""
    registry = ClientConnectionManager()
    registry.add_client("dev-1", "linux", object())
    hub = Hub(
        settings=Settings(),
        registry=registry,
        sessions=SessionManager(registry),
        runners=[],
    )
    snapshot = asyncio.run(DashboardFeed(hub=hub, store=None, metrics=Metrics()).snapshot())
    assert [d["client_id"] for d in snapshot["devices"]] == ["dev-1"]
    assert snapshot["sessions"] is None
    assert "without a database" in snapshot["sessions_error"]
    assert snapshot["store"] == {"enabled": False, "degraded": False, "queue_depth": 0}


class TestEndpoints:
    @pytest.mark.parametrize(
        "path", ["/api/events", "/api/dashboard/snapshot", "/api/dashboard/sessions/x"]
    )
    def test_data_needs_the_api_key(self, server: ServerThread, path: str) -> None:
        """Without X-API-Key, or with a wrong one, the dashboard's data is refused with 401."""
        assert httpx.get(server.http_url + path).status_code == 401
        wrong = httpx.get(server.http_url + path, headers={"X-API-Key": "wrong"})
        assert wrong.status_code == 401

    def test_page_is_public_and_locked_down(self, server: ServerThread) -> None:
        """The page loads without a key (it asks for it) and forbids foreign scripts and forms."""
        page = httpx.get(server.http_url + "/dashboard")
        assert page.status_code == 200
        assert 'id="api-key"' in page.text
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "form-action 'none'" in policy
        assert httpx.get(server.http_url + "/dashboard/dashboard.js").status_code == 200
        assert httpx.get(server.http_url + "/dashboard/dashboard.py").status_code == 404

    def test_snapshot_lists_devices_and_finished_sessions(self, server: ServerThread) -> None:
        """A connected device and a completed session show up with what the tables need."""
        with DemoDevice(server.ws_url, features=["demo_tools", "ocr"]):
            end = asyncio.run(
                run_constellation(
                    server.ws_url,
                    "demo-constellation",
                    "demo-device",
                    PLAN,
                    session_id="dash-1",
                    task_timeout=10,
                )
            )
            assert end["status"] == "completed"
            snapshot = wait_for_snapshot(
                server, lambda s: sum(s["series"]["sessions_started"]) == 1
            )
        (device,) = snapshot["devices"]
        assert (device["client_id"], device["platform"], device["mode"]) == (
            "demo-device",
            "linux",
            "agent",
        )
        assert device["capabilities"] == ["demo_tools", "ocr"]
        assert device["connected_at"]
        assert device["last_heartbeat_at"]
        session = snapshot["sessions"][0]
        assert (session["session_id"], session["state"], session["device_id"]) == (
            "dash-1",
            "completed",
            "demo-device",
        )
        assert session["duration_seconds"] >= 0
        assert "request" not in session
        assert "result" not in session
        assert snapshot["series"]["devices"][-1] == 1
        assert snapshot["store"]["enabled"] is True
        assert len(snapshot["series"]["minutes"]) == 60

    def test_session_story_has_request_result_and_connection(self, server: ServerThread) -> None:
        """`/api/dashboard/sessions/{id}` (the id of one run, from the snapshot) gives the row
        with request and result, its duration, and the device's connection at the time."""
        with DemoDevice(server.ws_url):
            end = asyncio.run(
                run_constellation(
                    server.ws_url,
                    "demo-constellation",
                    "demo-device",
                    PLAN,
                    session_id="dash/story #1",
                    task_timeout=10,
                )
            )
            assert end["status"] == "completed"
            snapshot = wait_for_snapshot(server, lambda s: bool(s["sessions"]))
            run_id = snapshot["sessions"][0]["id"]
            with server.http() as http:
                story = http.get(f"/api/dashboard/sessions/{run_id}").json()
                by_wire_id = http.get("/api/dashboard/sessions/dash%2Fstory%20%231").json()
                missing = http.get("/api/dashboard/sessions/no-such-run")
        assert story["session"]["session_id"] == "dash/story #1"
        assert json.loads(story["session"]["request"]) == json.loads(PLAN)
        assert story["session"]["result"][0]["result"] == 5
        assert story["duration_seconds"] >= 0
        assert story["device_connection"]["client_id"] == "demo-device"
        assert story["device_connection"]["disconnected_at"] is None
        assert by_wire_id["session"]["id"] == run_id
        assert missing.status_code == 404

    def test_sessions_are_read_again_only_after_a_commit(self, server: ServerThread) -> None:
        """Snapshots reuse the recent sessions until the store commits something new."""
        reads: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "FROM sessions" in statement:
                reads.append(statement)

        engine = server.app.state.store.engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            with server.http() as http:
                http.get("/api/dashboard/snapshot")
                http.get("/api/dashboard/snapshot")
                assert len(reads) == 1
                with DemoDevice(server.ws_url):
                    server.flush()  # the registration is committed
                    http.get("/api/dashboard/snapshot")
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert len(reads) == 2

    def test_stream_sends_a_snapshot_then_changes(self, server: ServerThread) -> None:
        """The stream opens with a snapshot and sends a new one when a device connects."""
        with server.http() as http, http.stream("GET", "/api/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = events(response)
            name, first = next(stream)
            assert (name, first["devices"]) == ("snapshot", [])
            with DemoDevice(server.ws_url):
                name, second = next(stream)
        assert name == "snapshot"
        assert [d["client_id"] for d in second["devices"]] == ["demo-device"]

    def test_stream_ends_cleanly_when_the_server_stops(self, server: ServerThread) -> None:
        """Stopping the server ends open streams at once instead of cutting them mid-body."""
        outcome: list[str] = []
        opened = threading.Event()

        def follow() -> None:
            try:
                with server.http() as http, http.stream("GET", "/api/events") as response:
                    for _ in events(response):
                        opened.set()
                outcome.append("ended")
            except httpx.HTTPError as exc:
                outcome.append(repr(exc))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert opened.wait(10)
        server.stop()
        reader.join(10)
        assert outcome == ["ended"]
