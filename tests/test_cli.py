"""The `ccm` command through typer's runner, on a temporary SQLite file and a temporary config."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ccm import cli
from ccm.cli import app
from ccm.config import ENV_KEYS
from ccm.domain import ClientType, Mode, Origin
from ccm.errors import CcmError
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter, migrate
from ccm.store.engine import make_engine
from ccm.store.models import connections, sessions

runner = CliRunner()


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CCM_* variable or ./config/ccm.yaml of the developer's leaks into a test; wide output."""
    for var in ENV_KEYS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CCM_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ccm.yaml"
    path.write_text("data_dir: data\n", encoding="utf-8")
    return path


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'ccm.db'}"


def _run(config: Path, url: str, *args: str) -> Any:
    result = runner.invoke(app, [*args, "--config", str(config), "--database-url", url])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _json(config: Path, url: str, *args: str) -> Any:
    return json.loads(_run(config, url, *args, "--json").stdout)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class History:
    dev1_connections: list[str]
    """Newest first."""
    recent_dev1_sessions: list[str]
    """Wire ids of dev-1's sessions created in the last day, newest first."""


@pytest.fixture
def history(url: str, sqlite_template: Path, tmp_path: Path) -> History:
    """A history written through the registry and SessionManager, relative to the real now:

    clients: dev-1 (online, reconnected), con-1 (online), dev-2 (left an hour ago), dev-old (left
    40 days ago); sessions of dev-1 and dev-2, finished 10/9 days ago, an hour ago, or running.
    """
    shutil.copyfile(sqlite_template, tmp_path / "ccm.db")
    engine = make_engine(url)
    store = Store(engine, StoreWriter(engine))
    now = datetime.now(UTC)
    clock = FakeClock(now)
    registry = ClientConnectionManager(store=store, clock=clock)
    manager = SessionManager(registry, store=store, clock=clock)

    def at(**ago: float) -> None:
        clock.now = now - timedelta(**ago)

    at(days=41)
    registry.add_client("dev-old", "linux", object(), remote_address="10.0.0.9:1")
    at(days=40)
    registry.remove_client("dev-old", reason="closed")
    at(days=20)
    first = registry.add_client("dev-1", "windows", object(), remote_address="10.0.0.1:1")
    manager.create("s-stuck", "dev-1", origin=Origin.DEVICE, mode=Mode.RELAY)
    at(days=19)
    registry.remove_client("dev-1", reason="heartbeat_timeout")
    at(days=10)
    manager.create("s-old-done", "dev-1", origin=Origin.DEVICE, mode=Mode.RELAY)
    manager.complete("s-old-done")
    at(days=9)
    manager.create("s-old-fail", "dev-2", origin=Origin.DEVICE, mode=Mode.RELAY)
    manager.fail("s-old-fail", error="boom")
    at(hours=2)
    second = registry.add_client("dev-1", "windows", object(), remote_address="10.0.0.1:2")
    registry.add_client("dev-2", "linux", object())
    registry.add_client("con-1", "linux", object(), ClientType.CONSTELLATION)
    manager.create(
        "s-recent-done",
        "dev-1",
        origin=Origin.CONSTELLATION,
        mode=Mode.RELAY,
        constellation_id="con-1",
    )
    at(hours=1)
    manager.complete("s-recent-done", result={"ok": True})
    registry.remove_client("dev-2")
    at(minutes=30)
    manager.create(
        "s-recent-run",
        "dev-1",
        origin=Origin.CONSTELLATION,
        mode=Mode.RELAY,
        constellation_id="con-1",
    )
    assert store.writer.stop() is True
    engine.dispose()
    return History(
        dev1_connections=[second.connection_id, first.connection_id],
        recent_dev1_sessions=["s-recent-run", "s-recent-done"],
    )


def _count(url: str, table: Any) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    finally:
        engine.dispose()


class TestDb:
    def test_upgrade_migrates_a_new_file_to_head(self, config: Path, url: str) -> None:
        """`db upgrade` creates the schema and prints the head revision."""
        result = _run(config, url, "db", "upgrade")

        assert f"database at {migrate.head_revision()}" in result.stdout
        engine = make_engine(url)
        try:
            assert migrate.current_revision(engine) == migrate.head_revision()
        finally:
            engine.dispose()

    def test_current_json_reports_up_to_date(self, config: Path, url: str) -> None:
        """`db current --json` after an upgrade says up_to_date with current == head."""
        _run(config, url, "db", "upgrade")

        data = _json(config, url, "db", "current")

        head = migrate.head_revision()
        assert data == {"current": head, "head": head, "up_to_date": True}

    def test_current_json_reports_empty_database(self, config: Path, url: str) -> None:
        """`db current --json` on a new file says it is not up to date."""
        data = _json(config, url, "db", "current")

        assert (data["current"], data["up_to_date"]) == (None, False)

    def test_check_passes_at_head(self, config: Path, url: str) -> None:
        """`db check` after an upgrade confirms the schema matches the models."""
        _run(config, url, "db", "upgrade")

        result = _run(config, url, "db", "check")

        assert "schema matches the models" in result.stdout

    def test_check_refuses_an_outdated_database(self, config: Path, url: str) -> None:
        """`db check` on an unmigrated database fails with a CcmError that says what to run."""
        result = runner.invoke(app, ["db", "check", "--config", str(config), "--database-url", url])

        assert isinstance(result.exception, CcmError)
        assert "ccm db upgrade" in str(result.exception)


class TestAudit:
    def test_online_json_lists_online_clients(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit online --json` lists exactly the clients online now, with their types."""
        data = _json(config, url, "audit", "online")

        assert {(c["client_id"], c["client_type"]) for c in data} == {
            ("dev-1", "device"),
            ("con-1", "constellation"),
        }
        assert all(c["online"] is True for c in data)

    def test_online_json_counts_each_device_running_and_queued_sessions(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit online --json` gives a device its sessions running and queued in SQL (dev-1:
        s-stuck and s-recent-run), a constellation neither."""
        data = {c["client_id"]: c for c in _json(config, url, "audit", "online")}

        assert (data["dev-1"]["running"], data["dev-1"]["queued"]) == (2, 0)
        assert "running" not in data["con-1"]

    def test_online_table_shows_client_ids(self, config: Path, url: str, history: History) -> None:
        """The table form of `audit online` names each online client."""
        result = _run(config, url, "audit", "online")

        assert "2 clients online" in result.stdout
        assert "dev-1" in result.stdout
        assert "con-1" in result.stdout
        assert "dev-old" not in result.stdout

    def test_connections_json_lists_history_newest_first(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit connections dev-1 --json` gives both connections, newest first, with reasons."""
        data = _json(config, url, "audit", "connections", "dev-1")

        assert [c["connection_id"] for c in data] == history.dev1_connections
        assert [c["disconnect_reason"] for c in data] == [None, "heartbeat_timeout"]
        assert [c["remote_address"] for c in data] == ["10.0.0.1:2", "10.0.0.1:1"]

    def test_connections_table_shows_connection_ids(
        self, config: Path, url: str, history: History
    ) -> None:
        """The table form of `audit connections` shows the connection ids and the reason."""
        result = _run(config, url, "audit", "connections", "dev-1")

        assert "connections of dev-1" in result.stdout
        for connection_id in history.dev1_connections:
            assert connection_id in result.stdout
        assert "heartbeat_timeout" in result.stdout

    def test_sessions_json_filters_by_device_and_since(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit sessions --device dev-1 --since 1d` lists only that device's recent sessions."""
        data = _json(config, url, "audit", "sessions", "--device", "dev-1", "--since", "1d")

        assert [s["session_id"] for s in data] == history.recent_dev1_sessions
        assert [s["state"] for s in data] == ["running", "completed"]
        assert data[1]["result"] == {"ok": True}
        assert {s["constellation_id"] for s in data} == {"con-1"}

    def test_sessions_json_filters_by_state(self, config: Path, url: str, history: History) -> None:
        """`audit sessions --state failed` lists only failed sessions, with their error."""
        data = _json(config, url, "audit", "sessions", "--state", "failed")

        assert [(s["session_id"], s["error"]) for s in data] == [("s-old-fail", "boom")]

    def test_sessions_table_shows_session_ids(
        self, config: Path, url: str, history: History
    ) -> None:
        """The table form of `audit sessions` names the sessions found."""
        result = _run(config, url, "audit", "sessions", "--device", "dev-1", "--since", "1d")

        assert "2 sessions" in result.stdout
        assert "s-recent-run" in result.stdout
        assert "s-old-done" not in result.stdout

    def test_bad_since_exits_nonzero_with_message(
        self,
        config: Path,
        url: str,
        history: History,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`ccm audit sessions --since yesterday` exits 1 with one line saying what to write."""
        argv = ["ccm", "audit", "sessions", "--since", "yesterday"]
        monkeypatch.setattr(sys, "argv", [*argv, "--config", str(config), "--database-url", url])

        with pytest.raises(SystemExit) as exited:
            cli.main()

        assert exited.value.code == 1
        message = capsys.readouterr().err
        assert "cannot read time 'yesterday'" in message
        assert "Traceback" not in message

    def test_time_without_offset_exits_nonzero(
        self,
        config: Path,
        url: str,
        history: History,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """An ISO time without a UTC offset is refused rather than guessed."""
        argv = ["ccm", "audit", "connections", "dev-1", "--since", "2026-01-01T00:00:00"]
        monkeypatch.setattr(sys, "argv", [*argv, "--config", str(config), "--database-url", url])

        with pytest.raises(SystemExit) as exited:
            cli.main()

        assert exited.value.code == 1
        assert "no UTC offset" in capsys.readouterr().err


class TestCleanup:
    def test_dry_run_json_counts_and_deletes_nothing(
        self, config: Path, url: str, history: History
    ) -> None:
        """`cleanup --finished-before 7d --dry-run --json` counts 2 sessions and 1 connection."""
        data = _json(config, url, "cleanup", "--finished-before", "7d", "--dry-run")

        assert (data["dry_run"], data["sessions"], data["connections"]) == (True, 2, 1)
        assert _count(url, sessions) == 5
        assert _count(url, connections) == 5

    def test_cleanup_deletes_finished_old_rows(
        self, config: Path, url: str, history: History
    ) -> None:
        """A real cleanup deletes the 2 old finished sessions and the 1 old closed connection."""
        result = _run(config, url, "cleanup", "--finished-before", "7d")

        assert "deleted 2 sessions" in result.stdout
        assert "1 connections" in result.stdout
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                left = set(conn.execute(select(sessions.c.session_id)).scalars())
                clients_left = set(conn.execute(select(connections.c.client_id)).scalars())
        finally:
            engine.dispose()
        assert left == {"s-stuck", "s-recent-done", "s-recent-run"}
        assert "dev-old" not in clients_left
        assert _count(url, connections) == 4

    def test_cleanup_json_reports_deleted_counts(
        self, config: Path, url: str, history: History
    ) -> None:
        """`cleanup --json` (no dry run) deletes and reports what it deleted."""
        data = _json(config, url, "cleanup", "--finished-before", "7d")

        assert (data["dry_run"], data["sessions"], data["connections"]) == (False, 2, 1)
        assert _count(url, sessions) == 3

    def test_bad_duration_exits_nonzero_with_message(
        self,
        config: Path,
        url: str,
        history: History,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`cleanup --finished-before 7x` exits 1 with a one-line message and deletes nothing."""
        argv = ["ccm", "cleanup", "--finished-before", "7x"]
        monkeypatch.setattr(sys, "argv", [*argv, "--config", str(config), "--database-url", url])

        with pytest.raises(SystemExit) as exited:
            cli.main()

        assert exited.value.code == 1
        assert "--finished-before '7x'" in capsys.readouterr().err
        assert _count(url, sessions) == 5


class TestAuditTables:
    def test_sessions_table_has_duration_reason_and_error(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit sessions` shows how long each ran, and why it failed."""
        result = _run(config, url, "audit", "sessions", "--state", "failed")

        row = next(line for line in result.stdout.splitlines() if "s-old-fail" in line)
        assert "failed" in row
        assert "boom" in row
        assert "0 ms" in row  # created and failed at the same instant
        assert "duration" in result.stdout
        assert "error" in result.stdout

    def test_running_session_shows_its_time_so_far(
        self, config: Path, url: str, history: History
    ) -> None:
        """A running session's duration counts from its start, marked as not over."""
        result = _run(config, url, "audit", "sessions", "--state", "running", "--since", "1h")

        row = next(line for line in result.stdout.splitlines() if "s-recent-run" in line)
        assert "30 m" in row
        assert "so far" in row

    def test_ids_are_never_cut_in_a_narrow_terminal(
        self, config: Path, url: str, history: History, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At 60 columns cells fold onto more lines instead of ending in '…'; with --wide each
        connection id is whole on its line."""
        monkeypatch.setenv("COLUMNS", "60")
        folded = _run(config, url, "audit", "connections", "dev-1").stdout
        wide = _run(config, url, "audit", "connections", "dev-1", "--wide").stdout

        assert "…" not in folded
        for connection_id in history.dev1_connections:
            assert connection_id not in folded  # it did not fit on one line at 60 columns
            assert connection_id in wide

    def test_connections_table_says_how_long_each_lasted(
        self, config: Path, url: str, history: History
    ) -> None:
        """The open connection says `open`; the closed one how long it lasted (a day)."""
        result = _run(config, url, "audit", "connections", "dev-1")

        lines = result.stdout.splitlines()
        open_row = next(line for line in lines if history.dev1_connections[0] in line)
        closed_row = next(line for line in lines if history.dev1_connections[1] in line)
        assert "open" in open_row
        assert "so far" not in closed_row
        assert "1 d 0 h" in closed_row
        assert "heartbeat_timeout" in closed_row


class TestAuditSession:
    def test_story_json_has_the_device_connection_at_the_time(
        self, config: Path, url: str, history: History
    ) -> None:
        """`audit session s-recent-done --json`: the row, its duration, and the connections of
        the device and of the constellation that were open when it was created."""
        story = _json(config, url, "audit", "session", "s-recent-done")

        assert story["session"]["state"] == "completed"
        assert story["session"]["result"] == {"ok": True}
        assert story["duration_seconds"] == pytest.approx(3600, abs=1)
        assert story["device_connection"]["connection_id"] == history.dev1_connections[0]
        assert story["requester_connection"]["client_id"] == "con-1"
        assert story["other_runs"] == []

    def test_story_of_a_session_created_while_the_device_was_away(
        self, config: Path, url: str, history: History
    ) -> None:
        """s-old-done ran while dev-1 had no open connection: the story says none."""
        story = _json(config, url, "audit", "session", "s-old-done")

        assert story["device_connection"] is None

    def test_story_text_tells_the_whole_run(self, config: Path, url: str, history: History) -> None:
        """The text form has the requester, state, times, duration and the result."""
        text = _run(config, url, "audit", "session", "s-recent-done").stdout

        assert "requester   con-1 (constellation)" in text
        assert "state       completed" in text
        assert "duration    1 h 00 m" in text
        assert f"device connection     {history.dev1_connections[0]} from 10.0.0.1:2" in text
        assert '"ok": true' in text

    def test_story_by_run_id(self, config: Path, url: str, history: History) -> None:
        """A run's own id (from --json or the dashboard) opens that run."""
        run_id = _json(config, url, "audit", "session", "s-old-fail")["session"]["id"]

        story = _json(config, url, "audit", "session", run_id)

        assert story["session"]["session_id"] == "s-old-fail"
        assert story["session"]["error"] == "boom"

    def test_unknown_session_is_one_line(
        self,
        config: Path,
        url: str,
        history: History,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """An id that is not there says so and where to look."""
        argv = ["ccm", "audit", "session", "nope", "--config", str(config), "--database-url", url]
        monkeypatch.setattr(sys, "argv", argv)

        with pytest.raises(SystemExit) as exited:
            cli.main()

        assert exited.value.code == 1
        assert "no session 'nope'" in capsys.readouterr().err
