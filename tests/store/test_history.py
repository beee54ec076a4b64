"""History written through the registry and SessionManager, read back from real SQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ccm.config import DuplicatePolicy
from ccm.domain import ClientType, Mode, Origin, SessionState
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter
from ccm.store.models import clients, connections, server_runs, sessions
from ccm.store.repository import (
    read_connection_history,
    read_online_clients,
    read_session_counts,
    read_sessions,
)

FLUSH_TIMEOUT = 60  # upper bound only: a hung writer fails the test instead of hanging it
T0 = datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=UTC)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: Engine) -> Iterator[Store]:
    store = Store(engine, StoreWriter(engine, batch_size=100))
    store.writer.start()
    yield store
    store.writer.stop()


@pytest.fixture
def registry(store: Store, clock: FakeClock) -> ClientConnectionManager:
    return ClientConnectionManager(store=store, clock=clock)


@pytest.fixture
def manager(registry: ClientConnectionManager, store: Store, clock: FakeClock) -> SessionManager:
    return SessionManager(registry, store=store, clock=clock)


def _flush(store: Store) -> None:
    store.writer.flush().result(FLUSH_TIMEOUT)


def _one(engine: Engine, table: Any, key: Any, value: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(table).where(key == value)).mappings().one())


def _client(engine: Engine, client_id: str) -> dict[str, Any]:
    return _one(engine, clients, clients.c.client_id, client_id)


def _connection(engine: Engine, connection_id: str) -> dict[str, Any]:
    return _one(engine, connections, connections.c.connection_id, connection_id)


def _session(engine: Engine, run_id: str) -> dict[str, Any]:
    return _one(engine, sessions, sessions.c.id, run_id)


DEVICE_INFO = {"os": "Windows 11", "supported_features": ["excel"], "tags": ["lab"]}


def _add_device(registry: ClientConnectionManager, device_id: str = "dev-1", **kwargs: Any) -> Any:
    return registry.add_client(
        device_id,
        "windows",
        object(),
        ClientType.DEVICE,
        metadata={"system_info": DEVICE_INFO, "version": "3.1"},
        remote_address="10.1.2.3:50001",
        **kwargs,
    )


def _add_constellation(registry: ClientConnectionManager, client_id: str = "con-1") -> Any:
    return registry.add_client(
        client_id,
        "linux",
        object(),
        ClientType.CONSTELLATION,
        metadata={"owner": "ops"},
        remote_address="10.9.9.9:40000",
    )


class TestRegistration:
    def test_device_registration_writes_client_row(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """A registered device is an online `clients` row with what it reported."""
        info = _add_device(registry)
        _flush(store)

        row = _client(engine, "dev-1")
        assert row["online"] is True
        assert row["client_type"] == "device"
        assert row["platform"] == "windows"
        assert row["metadata"] == {"system_info": DEVICE_INFO, "version": "3.1"}
        assert row["system_info"] == DEVICE_INFO
        assert row["current_connection_id"] == info.connection_id

    def test_client_timestamps_are_aware_utc(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """first_seen_at and last_seen_at come back as the registration time, aware UTC."""
        _add_device(registry)
        _flush(store)

        row = _client(engine, "dev-1")
        assert row["first_seen_at"] == T0
        assert row["last_seen_at"] == T0
        assert row["first_seen_at"].utcoffset() == timedelta(0)
        assert row["last_seen_at"].utcoffset() == timedelta(0)

    def test_device_registration_writes_connection_row(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """The registration's connection row names client, time, address and server run."""
        info = _add_device(registry)
        _flush(store)

        row = _connection(engine, info.connection_id)
        assert row["client_id"] == "dev-1"
        assert row["client_type"] == "device"
        assert row["connected_at"] == T0
        assert row["connected_at"].utcoffset() == timedelta(0)
        assert row["remote_address"] == "10.1.2.3:50001"
        assert row["server_run_id"] == store.run_id
        assert row["disconnected_at"] is None
        assert row["disconnect_reason"] is None

    def test_constellation_registration_writes_rows(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """A constellation is an online `clients` row without system info, with its connection."""
        info = _add_constellation(registry)
        _flush(store)

        client = _client(engine, "con-1")
        assert (client["client_type"], client["online"], client["system_info"]) == (
            "constellation",
            True,
            None,
        )
        assert client["metadata"] == {"owner": "ops"}
        connection = _connection(engine, info.connection_id)
        assert (connection["client_type"], connection["remote_address"]) == (
            "constellation",
            "10.9.9.9:40000",
        )

    def test_remove_client_closes_connection_with_reason(
        self,
        engine: Engine,
        store: Store,
        registry: ClientConnectionManager,
        clock: FakeClock,
    ) -> None:
        """remove_client records the disconnect time and reason and marks the client offline."""
        info = _add_device(registry)
        left_at = clock.advance(minutes=5)
        registry.remove_client("dev-1", reason="heartbeat_timeout")
        _flush(store)

        connection = _connection(engine, info.connection_id)
        assert connection["disconnected_at"] == left_at
        assert connection["disconnect_reason"] == "heartbeat_timeout"
        client = _client(engine, "dev-1")
        assert client["online"] is False
        assert client["current_connection_id"] is None
        assert client["last_seen_at"] == left_at

    def test_reconnect_keeps_first_seen_and_updates_last_seen(
        self,
        engine: Engine,
        store: Store,
        registry: ClientConnectionManager,
        clock: FakeClock,
    ) -> None:
        """A second registration of the same id keeps first_seen_at and moves last_seen_at."""
        first = _add_device(registry)
        clock.advance(minutes=1)
        registry.remove_client("dev-1")
        again_at = clock.advance(hours=2)
        second = _add_device(registry)
        _flush(store)

        client = _client(engine, "dev-1")
        assert (client["first_seen_at"], client["last_seen_at"]) == (T0, again_at)
        assert client["online"] is True
        assert client["current_connection_id"] == second.connection_id
        history = read_connection_history(engine, "dev-1")
        assert [c.connection_id for c in history] == [second.connection_id, first.connection_id]


class TestTakeover:
    @pytest.fixture
    def registry(self, store: Store, clock: FakeClock) -> ClientConnectionManager:
        return ClientConnectionManager(
            store=store, clock=clock, duplicate_policy=DuplicatePolicy.TAKEOVER
        )

    def test_takeover_closes_old_connection_as_replaced(
        self,
        engine: Engine,
        store: Store,
        registry: ClientConnectionManager,
        clock: FakeClock,
    ) -> None:
        """The evicted connection is closed with reason `replaced` at the takeover time."""
        old = _add_device(registry)
        taken_at = clock.advance(seconds=30)
        new = _add_device(registry)
        _flush(store)

        assert new.replaced is old
        row = _connection(engine, old.connection_id)
        assert (row["disconnect_reason"], row["disconnected_at"]) == ("replaced", taken_at)
        assert _connection(engine, new.connection_id)["disconnected_at"] is None

    def test_takeover_keeps_client_online_on_new_connection(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """After a takeover the client is online and points at the new connection."""
        _add_device(registry)
        new = _add_device(registry)
        _flush(store)

        client = _client(engine, "dev-1")
        assert client["online"] is True
        assert client["current_connection_id"] == new.connection_id

    def test_late_remove_of_replaced_epoch_keeps_client_online(
        self, engine: Engine, store: Store, registry: ClientConnectionManager
    ) -> None:
        """remove_client with the replaced registration's epoch changes nothing, live or in SQL."""
        old = _add_device(registry)
        new = _add_device(registry)

        assert registry.remove_client("dev-1", epoch=old.epoch, reason="closed") is None
        _flush(store)

        assert registry.is_online("dev-1")
        client = _client(engine, "dev-1")
        assert (client["online"], client["current_connection_id"]) == (True, new.connection_id)
        assert _connection(engine, old.connection_id)["disconnect_reason"] == "replaced"

    def test_late_disconnect_of_replaced_connection_keeps_client_online(
        self,
        engine: Engine,
        store: Store,
        registry: ClientConnectionManager,
        clock: FakeClock,
    ) -> None:
        """A disconnect write for the replaced connection neither reopens nor offlines anything."""
        old = _add_device(registry)
        new = _add_device(registry)
        store.record_disconnect(
            connection_id=old.connection_id,
            client_id="dev-1",
            reason="closed",
            at=clock.advance(minutes=1),
        )
        _flush(store)

        client = _client(engine, "dev-1")
        assert (client["online"], client["current_connection_id"]) == (True, new.connection_id)
        assert _connection(engine, old.connection_id)["disconnect_reason"] == "replaced"


class TestSessions:
    @pytest.fixture(autouse=True)
    def _parties(self, registry: ClientConnectionManager) -> None:
        _add_device(registry)
        _add_constellation(registry)

    def _create(self, manager: SessionManager, session_id: str = "s-1") -> Any:
        return manager.create(
            session_id,
            "dev-1",
            origin=Origin.CONSTELLATION,
            mode=Mode.RELAY,
            constellation_id="con-1",
            task_name="open_excel",
            request="open the sales sheet",
        )

    def test_create_writes_running_row(
        self, engine: Engine, store: Store, manager: SessionManager
    ) -> None:
        """A created session is a `running` row with who asked, where, and when."""
        session = self._create(manager)
        _flush(store)

        row = _session(engine, session.id)
        assert row["state"] == "running"
        assert (row["session_id"], row["device_id"], row["constellation_id"]) == (
            "s-1",
            "dev-1",
            "con-1",
        )
        assert (row["origin"], row["mode"], row["task_name"], row["request"]) == (
            "constellation",
            "relay",
            "open_excel",
            "open the sales sheet",
        )
        assert (row["created_at"], row["started_at"], row["ended_at"]) == (T0, T0, None)
        assert row["server_run_id"] == store.run_id

    def test_complete_writes_completed_row_with_result(
        self, engine: Engine, store: Store, manager: SessionManager, clock: FakeClock
    ) -> None:
        """complete() stores state `completed`, the result JSON and the end time."""
        session = self._create(manager)
        ended_at = clock.advance(seconds=42)
        result = {"rows": 12, "files": ["a.xlsx", "b.xlsx"], "ok": True, "score": 0.5}
        manager.complete("s-1", result=result)
        _flush(store)

        row = _session(engine, session.id)
        assert (row["state"], row["result"], row["ended_at"]) == ("completed", result, ended_at)
        assert (row["error"], row["reason"]) == (None, None)

    def test_fail_writes_failed_row_with_error_and_reason(
        self, engine: Engine, store: Store, manager: SessionManager
    ) -> None:
        """fail() stores state `failed` with the error text and the reason."""
        session = self._create(manager)
        manager.fail("s-1", error="excel crashed", reason="device_error")
        _flush(store)

        row = _session(engine, session.id)
        assert (row["state"], row["error"], row["reason"]) == (
            "failed",
            "excel crashed",
            "device_error",
        )
        assert row["ended_at"] is not None

    def test_cancel_twice_cancels_once(
        self, engine: Engine, store: Store, manager: SessionManager, clock: FakeClock
    ) -> None:
        """A second cancel returns None and leaves the first end time and reason in place."""
        session = self._create(manager)
        first_end = clock.advance(seconds=5)
        first = manager.cancel_task("s-1", reason="user_cancelled")
        clock.advance(seconds=5)
        second = manager.cancel_task("s-1", reason="device_disconnected")
        _flush(store)

        assert first is not None
        assert second is None
        row = _session(engine, session.id)
        assert (row["state"], row["reason"], row["ended_at"]) == (
            "cancelled",
            "user_cancelled",
            first_end,
        )

    def test_ending_sessions_empties_registry_maps(
        self, registry: ClientConnectionManager, manager: SessionManager
    ) -> None:
        """Completed, failed and cancelled sessions leave no entry in the registry's maps."""
        for session_id in ("s-1", "s-2", "s-3"):
            self._create(manager, session_id)
        assert registry.session_count() == 3

        manager.complete("s-1")
        manager.fail("s-2", error="x")
        manager.cancel_task("s-3", reason="user_cancelled")

        assert registry.session_count() == 0
        assert registry.get_constellation_sessions("con-1") == []
        assert registry.get_device_sessions("dev-1") == []

    def test_replayed_end_does_not_overwrite_first_end(
        self, engine: Engine, store: Store, manager: SessionManager, clock: FakeClock
    ) -> None:
        """A second `session_ended` write for a finished run changes nothing (guarded update)."""
        session = self._create(manager)
        ended_at = clock.advance(seconds=1)
        manager.complete("s-1", result={"ok": True})
        store.record_session_ended(
            id=session.id,
            state=SessionState.FAILED,
            reason="late",
            result=None,
            error="late",
            at=clock.advance(seconds=1),
        )
        _flush(store)

        row = _session(engine, session.id)
        assert (row["state"], row["result"], row["ended_at"]) == (
            "completed",
            {"ok": True},
            ended_at,
        )

    def test_read_sessions_filters_by_device_and_state(
        self, engine: Engine, store: Store, manager: SessionManager, clock: FakeClock
    ) -> None:
        """read_sessions returns one device's sessions of one state, newest first."""
        first = self._create(manager, "s-1")
        clock.advance(seconds=1)
        second = self._create(manager, "s-2")
        clock.advance(seconds=1)
        manager.create("s-3", "dev-other", origin=Origin.HTTP, mode=Mode.AGENT)
        clock.advance(seconds=1)
        self._create(manager, "s-4")
        manager.complete("s-4")
        _flush(store)

        rows = read_sessions(engine, device_id="dev-1", state="running")
        assert [r.id for r in rows] == [second.id, first.id]
        assert read_session_counts(engine) == {"running": 3, "completed": 1}


class TestRestartRecovery:
    @pytest.fixture
    def left_open(
        self,
        engine: Engine,
        store: Store,
        registry: ClientConnectionManager,
        manager: SessionManager,
    ) -> dict[str, Any]:
        """A previous run that stopped without closing anything: 2 open connections, 2 running
        sessions, plus a closed connection and a completed session that must stay as they are."""
        store.record_run_started(version="test")
        device = _add_device(registry)
        constellation = _add_constellation(registry)
        gone = _add_device(registry, "dev-gone")
        registry.remove_client("dev-gone", reason="closed")
        running = [
            manager.create(sid, "dev-1", origin=Origin.DEVICE, mode=Mode.RELAY)
            for sid in ("s-1", "s-2")
        ]
        done = manager.create("s-done", "dev-1", origin=Origin.DEVICE, mode=Mode.RELAY)
        manager.complete("s-done")
        assert store.writer.stop() is True
        return {
            "open": [device.connection_id, constellation.connection_id],
            "closed": gone.connection_id,
            "running": [s.id for s in running],
            "done": done.id,
            "run_id": store.run_id,
        }

    def test_recovery_report_counts(self, engine: Engine, left_open: dict[str, Any]) -> None:
        """The report counts the open connections, online clients and live sessions it closed."""
        report = Store(engine, StoreWriter(engine)).recover_after_restart()

        assert (
            report.connections_closed,
            report.clients_marked_offline,
            report.sessions_interrupted,
        ) == (2, 2, 2)

    def test_recovery_closes_open_connections(
        self, engine: Engine, left_open: dict[str, Any]
    ) -> None:
        """Open connections are closed at the recovery time with reason `server_restart`."""
        at = datetime(2026, 3, 2, tzinfo=UTC)
        Store(engine, StoreWriter(engine)).recover_after_restart(at=at)

        for connection_id in left_open["open"]:
            row = _connection(engine, connection_id)
            assert (row["disconnected_at"], row["disconnect_reason"]) == (at, "server_restart")
        assert _connection(engine, left_open["closed"])["disconnect_reason"] == "closed"

    def test_recovery_marks_clients_offline(
        self, engine: Engine, left_open: dict[str, Any]
    ) -> None:
        """Every client is offline with no current connection after recovery."""
        Store(engine, StoreWriter(engine)).recover_after_restart()

        assert read_online_clients(engine) == []
        for client_id in ("dev-1", "con-1"):
            assert _client(engine, client_id)["current_connection_id"] is None

    def test_recovery_interrupts_live_sessions(
        self, engine: Engine, left_open: dict[str, Any]
    ) -> None:
        """Running sessions become `interrupted` (server_restart); finished ones are untouched."""
        at = datetime(2026, 3, 2, tzinfo=UTC)
        Store(engine, StoreWriter(engine)).recover_after_restart(at=at)

        for run_id in left_open["running"]:
            row = _session(engine, run_id)
            assert (row["state"], row["reason"], row["ended_at"]) == (
                "interrupted",
                "server_restart",
                at,
            )
        done = _session(engine, left_open["done"])
        assert (done["state"], done["reason"]) == ("completed", None)

    def test_recovery_marks_previous_run_stopped(
        self, engine: Engine, left_open: dict[str, Any]
    ) -> None:
        """The previous server run gets its stopped_at set to the recovery time."""
        at = datetime(2026, 3, 2, tzinfo=UTC)
        Store(engine, StoreWriter(engine)).recover_after_restart(at=at)

        assert (
            _one(engine, server_runs, server_runs.c.run_id, left_open["run_id"])["stopped_at"] == at
        )

    def test_second_recovery_finds_nothing(self, engine: Engine, left_open: dict[str, Any]) -> None:
        """Recovery is idempotent: run again, it closes nothing more."""
        Store(engine, StoreWriter(engine)).recover_after_restart()
        report = Store(engine, StoreWriter(engine)).recover_after_restart()

        assert (
            report.connections_closed,
            report.clients_marked_offline,
            report.sessions_interrupted,
        ) == (0, 0, 0)
