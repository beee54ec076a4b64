"""StoreWriter on real databases: group commit, clean stop, flush, backlog bound, bad writes."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, Engine, event, func, select

from ccm.domain import Mode, Origin, SessionState
from ccm.errors import StoreBacklogFull
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter
from ccm.store.engine import make_engine
from ccm.store.models import clients, connections, sessions
from ccm.store.writes import CustomWrite

FLUSH_TIMEOUT = 60  # generous upper bound only, so a hung writer fails instead of hanging


def _count(engine: Engine, table) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _register(registry: ClientConnectionManager, n: int, prefix: str = "device") -> list[str]:
    ids = [f"{prefix}-{i:05d}" for i in range(n)]
    for client_id in ids:
        registry.add_client(client_id, "linux", object(), remote_address="10.0.0.1:5000")
    return ids


def _created(store: Store, *, id: str, device_id: str | None) -> None:
    store.record_session_created(
        id=id,
        session_id=f"wire-{id}",
        task_name="t",
        request="r",
        origin="constellation",
        constellation_id=None,
        device_id=device_id,  # type: ignore[arg-type]
        mode="relay",
        state=SessionState.RUNNING,
        at=datetime.now(UTC),
    )


@pytest.fixture
def make_store(engine: Engine) -> Iterator[Callable[..., Store]]:
    """Build Stores on the test's engine; every writer is stopped at teardown."""
    built: list[Store] = []

    def make(**writer_options: int) -> Store:
        store = Store(engine, StoreWriter(engine, **writer_options))
        built.append(store)
        return store

    yield make
    for store in built:
        store.writer.stop()


class TestBatching:
    def test_queued_writes_commit_in_few_transactions(self, engine: Engine, make_store) -> None:
        """2,000 registrations queued before start are applied in 4 transactions of 500."""
        store = make_store(batch_size=500)
        registry = ClientConnectionManager(store=store)
        ids = _register(registry, 2000)
        commits: list[None] = []

        def on_commit(_conn: Connection) -> None:
            commits.append(None)

        event.listen(engine, "commit", on_commit)
        try:
            store.writer.start()
            assert store.writer.stop() is True  # drains without adding a flush barrier
        finally:
            event.remove(engine, "commit", on_commit)

        assert len(commits) == 4
        stats = store.writer.stats()
        assert (stats.batches_committed, stats.writes_committed) == (4, 2000)
        assert stats.writes_failed == 0
        with engine.connect() as conn:
            stored = set(conn.execute(select(clients.c.client_id)).scalars())
        assert stored == set(ids)
        assert _count(engine, connections) == 2000

    def test_large_batch_size_commits_everything_at_once(self, engine: Engine, make_store) -> None:
        """With batch_size above the backlog, the whole backlog is one transaction."""
        store = make_store(batch_size=10_000)
        registry = ClientConnectionManager(store=store)
        _register(registry, 2000)

        store.writer.start()
        assert store.writer.stop() is True

        assert store.writer.stats().batches_committed == 1
        assert _count(engine, clients) == 2000


class TestStop:
    def test_stop_applies_everything_queued(self, engine: Engine, make_store) -> None:
        """A clean stop drains the queue: every queued registration is in the database."""
        store = make_store(batch_size=50)
        registry = ClientConnectionManager(store=store)
        store.writer.start()
        ids = _register(registry, 1500)

        assert store.writer.stop() is True

        assert not store.writer.running
        assert store.writer.stats().queue_depth == 0
        with engine.connect() as conn:
            stored = set(conn.execute(select(clients.c.client_id)).scalars())
        assert stored == set(ids)
        assert _count(engine, connections) == 1500

    def test_stop_of_a_never_started_writer_applies_the_queue(
        self, engine: Engine, make_store
    ) -> None:
        """stop() on a writer that never ran still applies what was queued (it reports drained)."""
        store = make_store()
        registry = ClientConnectionManager(store=store)
        _register(registry, 20)

        assert store.writer.stop() is True

        assert _count(engine, clients) == 20


class TestFlush:
    def test_flush_resolves_only_after_earlier_writes_are_visible(
        self, database_url: str, engine: Engine, make_store
    ) -> None:
        """The flush future waits for every earlier write, and then another connection sees them."""
        store = make_store(batch_size=100)
        registry = ClientConnectionManager(store=store)
        gate = threading.Event()
        store.writer.submit(CustomWrite("gate", lambda _conn: gate.wait(FLUSH_TIMEOUT)))
        ids = _register(registry, 300)
        store.writer.start()

        done = store.writer.flush()
        assert not done.done()  # the gate write has not finished, so nothing behind it has
        gate.set()
        done.result(FLUSH_TIMEOUT)

        other = make_engine(database_url)
        try:
            with other.connect() as conn:
                stored = set(conn.execute(select(clients.c.client_id)).scalars())
        finally:
            other.dispose()
        assert stored == set(ids)

    def test_durable_waits_for_the_commit(self, database_url: str, make_store) -> None:
        """`await writer.durable()` returns once the session queued before it is committed."""
        store = make_store()
        manager = SessionManager(ClientConnectionManager(store=store), store=store)
        store.writer.start()

        async def create_and_wait() -> str:
            session = manager.create("s-1", "device-1", origin=Origin.DEVICE, mode=Mode.RELAY)
            await store.writer.durable()
            return session.id

        run_id = asyncio.run(create_and_wait())

        other = make_engine(database_url)
        try:
            with other.connect() as conn:
                state = conn.execute(
                    select(sessions.c.state).where(sessions.c.id == run_id)
                ).scalar_one()
        finally:
            other.dispose()
        assert state == "running"

    def test_flush_without_a_running_writer_applies_inline(
        self, engine: Engine, make_store
    ) -> None:
        """flush() on a writer that is not running applies the queue before resolving."""
        store = make_store()
        _register(ClientConnectionManager(store=store), 10)

        store.writer.flush().result(FLUSH_TIMEOUT)

        assert _count(engine, clients) == 10


class TestBacklog:
    def test_reserve_raises_when_queue_is_at_its_bound(self, make_store) -> None:
        """reserve() refuses once max_queue writes are waiting."""
        store = make_store(max_queue=10)
        _register(ClientConnectionManager(store=store), 10)

        with pytest.raises(StoreBacklogFull):
            store.writer.reserve()

    def test_reserve_passes_below_the_bound(self, make_store) -> None:
        """reserve() accepts while the queue is one short of max_queue."""
        store = make_store(max_queue=10)
        _register(ClientConnectionManager(store=store), 9)

        store.writer.reserve()

        assert store.writer.has_capacity()

    def test_full_backlog_refuses_new_sessions(self, make_store) -> None:
        """SessionManager.create refuses with StoreBacklogFull and tracks nothing."""
        store = make_store(max_queue=5)
        registry = ClientConnectionManager(store=store)
        _register(registry, 5)
        manager = SessionManager(registry, store=store)

        with pytest.raises(StoreBacklogFull):
            manager.create("s-1", "device-00000", origin=Origin.DEVICE, mode=Mode.RELAY)

        assert len(manager) == 0
        assert registry.session_count() == 0


class TestBadWrites:
    def test_constraint_violation_drops_only_that_write(self, engine: Engine, make_store) -> None:
        """A write violating NOT NULL is dropped alone; the rest of its batch is committed."""
        store = make_store(batch_size=100)
        good = [str(uuid.uuid4()) for _ in range(20)]
        for i, run_id in enumerate(good):
            _created(store, id=run_id, device_id="device-1")
            if i == 10:
                _created(store, id="bad-session", device_id=None)
        store.writer.start()
        store.writer.flush().result(FLUSH_TIMEOUT)

        stats = store.writer.stats()
        assert (stats.writes_failed, stats.writes_committed) == (1, 20)
        with engine.connect() as conn:
            stored = set(conn.execute(select(sessions.c.id)).scalars())
        assert stored == set(good)

    def test_unbindable_value_drops_only_that_write(self, engine: Engine, make_store) -> None:
        """A write whose value cannot be bound (naive datetime) is dropped; the writer lives on."""
        store = make_store(batch_size=100)
        _created(store, id="before", device_id="device-1")
        store.record_disconnect(
            connection_id="c-1",
            client_id="x",
            reason="closed",
            at=datetime(2026, 1, 1),  # naive: refused by the UTC column type
        )
        _created(store, id="after", device_id="device-1")
        store.writer.start()
        store.writer.flush().result(FLUSH_TIMEOUT)
        _created(store, id="later", device_id="device-1")
        store.writer.flush().result(FLUSH_TIMEOUT)

        assert store.writer.stats().writes_failed == 1
        with engine.connect() as conn:
            stored = set(conn.execute(select(sessions.c.id)).scalars())
        assert stored == {"before", "after", "later"}
