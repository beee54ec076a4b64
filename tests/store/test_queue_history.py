"""What a device's queue leaves in SQL, on SQLite and Postgres: a session that waits is stored
`pending` without `started_at`, gets it when it runs, and restart recovery ends it `interrupted`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ccm.device_load import CapacityPolicy
from ccm.domain import ClientType, Mode, Origin, SessionState
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter
from ccm.store.models import sessions
from tests.store.test_history import FLUSH_TIMEOUT, FakeClock


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
def manager(store: Store, clock: FakeClock) -> SessionManager:
    """Sessions on a registry where every device runs one session at a time."""
    registry = ClientConnectionManager(store=store, clock=clock, capacity=CapacityPolicy(default=1))
    registry.add_client("dev-1", "windows", object(), ClientType.DEVICE, metadata={})
    return SessionManager(registry, store=store, clock=clock)


def _row(store: Store, run_id: str) -> dict[str, Any]:
    store.writer.flush().result(FLUSH_TIMEOUT)
    with store.engine.connect() as conn:
        return dict(conn.execute(select(sessions).where(sessions.c.id == run_id)).mappings().one())


def _create(manager: SessionManager, session_id: str) -> Any:
    return manager.create(session_id, "dev-1", origin=Origin.HTTP, mode=Mode.RELAY)


def test_a_waiting_session_is_stored_pending_without_started_at(
    store: Store, manager: SessionManager
) -> None:
    """The second session on a device of capacity 1 is `pending`, created but not started."""
    _create(manager, "s-1")
    waiting = _create(manager, "s-2")
    row = _row(store, waiting.id)
    assert (row["state"], row["started_at"]) == ("pending", None)
    assert row["created_at"] is not None


def test_a_waiting_session_gets_started_at_when_the_slot_frees(
    store: Store, manager: SessionManager, clock: FakeClock
) -> None:
    """Ending the running session starts the waiting one at that moment, in SQL too."""
    _create(manager, "s-1")
    waiting = _create(manager, "s-2")
    freed_at = clock.advance(seconds=30)
    ended = manager.complete("s-1")
    assert ended is not None
    assert [s.session_id for s in ended.started] == ["s-2"]
    row = _row(store, waiting.id)
    assert (row["state"], row["started_at"]) == ("running", freed_at)


def test_a_start_arriving_after_the_end_changes_nothing(
    store: Store, manager: SessionManager
) -> None:
    """The started write is guarded: replayed after the session ended, the end stays."""
    _create(manager, "s-1")
    waiting = _create(manager, "s-2")
    manager.finish("s-2", SessionState.CANCELLED)
    store.record_session_started(id=waiting.id, at=waiting.created_at)
    row = _row(store, waiting.id)
    assert (row["state"], row["started_at"]) == ("cancelled", None)


def test_restart_recovery_interrupts_pending_sessions(
    engine: Engine, store: Store, manager: SessionManager
) -> None:
    """Sessions a stopped process left pending end `interrupted` (server_restart) at start."""
    running = _create(manager, "s-1")
    waiting = _create(manager, "s-2")
    store.writer.flush().result(FLUSH_TIMEOUT)
    report = Store(engine, StoreWriter(engine)).recover_after_restart()
    assert report.sessions_interrupted == 2
    for run_id in (running.id, waiting.id):
        row = _row(store, run_id)
        assert (row["state"], row["reason"]) == (SessionState.INTERRUPTED, "server_restart")
