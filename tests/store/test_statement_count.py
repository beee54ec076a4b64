"""Regression guard for the write path's cost: SQL statements and transactions per session.

Counts, with SQLAlchemy cursor and commit events, what the store sends for a burst of relayed
sessions. Group commit and executemany mean the count must not grow with the number of sessions:
a per-event ORM write, a statement built per call, or a batch that falls back to row-by-row
(as an `IN` list bound as an "expanding" parameter did, which executemany refuses) all fail here,
and so does a batch whose interleaved kinds (a session's create, then its end, then the next
session's...) are no longer regrouped into one statement per kind. The writer's prepared
statements go through `exec_driver_sql`, which fires the same cursor events.
No timing is involved, so it cannot flake.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import Engine, event, func, select

from ccm.domain import ClientType, Mode, Origin, SessionState
from ccm.registry import ClientConnectionManager
from ccm.sessions import SessionManager
from ccm.store import Store, StoreWriter
from ccm.store.models import sessions

SESSIONS = 25


@dataclass
class SqlCounter:
    """Statements (an executemany counts once) and commits seen on one engine."""

    statements: list[tuple[str, int]] = field(default_factory=list)
    commits: int = 0

    def reset(self) -> None:
        self.statements.clear()
        self.commits = 0


@pytest.fixture
def counter(engine: Engine) -> Iterator[SqlCounter]:
    seen = SqlCounter()

    def on_execute(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        rows = len(parameters) if executemany else 1
        seen.statements.append((statement.split()[0].upper(), rows))

    def on_commit(conn):  # type: ignore[no-untyped-def]
        seen.commits += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    yield seen
    event.remove(engine, "before_cursor_execute", on_execute)
    event.remove(engine, "commit", on_commit)


@pytest.fixture
def relay(engine: Engine) -> tuple[Store, ClientConnectionManager, SessionManager]:
    """A store whose writer is not started: `flush()` applies the queue inline, one batch."""
    store = Store(engine, StoreWriter(engine, batch_size=500))
    registry = ClientConnectionManager(store=store)
    registry.add_client("const-1", "windows", object(), ClientType.CONSTELLATION)
    for i in range(5):
        registry.add_client(
            f"dev-{i}", "linux", object(), ClientType.DEVICE, {"ccm_execution": "relay"}
        )
    store.writer.flush().result(30)
    return store, registry, SessionManager(registry, store=store)


def _writes(counter: SqlCounter) -> list[tuple[str, int]]:
    return [s for s in counter.statements if s[0] in {"INSERT", "UPDATE", "DELETE"}]


class TestStatementsPerRelayedSession:
    def test_starting_many_sessions_is_one_statement_in_one_transaction(
        self, relay: tuple[Store, ClientConnectionManager, SessionManager], counter: SqlCounter
    ) -> None:
        """25 sessions created before one flush: one INSERT (executemany of 25), one commit."""
        store, _, manager = relay
        for i in range(SESSIONS):
            manager.create(
                f"const-1@t{i}",
                f"dev-{i % 5}",
                origin=Origin.CONSTELLATION,
                mode=Mode.RELAY,
                constellation_id="const-1",
                request="noop",
            )
        store.writer.flush().result(30)
        assert _writes(counter) == [("INSERT", SESSIONS)]
        assert counter.commits == 1

    def test_ending_many_sessions_is_one_statement_in_one_transaction(
        self,
        relay: tuple[Store, ClientConnectionManager, SessionManager],
        counter: SqlCounter,
        engine: Engine,
    ) -> None:
        """25 sessions ended before one flush: one UPDATE (executemany of 25), one commit, and
        every row really reached its final state (the batch did not fail over to single rows)."""
        store, _, manager = relay
        for i in range(SESSIONS):
            manager.create(
                f"const-1@t{i}",
                f"dev-{i % 5}",
                origin=Origin.CONSTELLATION,
                mode=Mode.RELAY,
                constellation_id="const-1",
                request="noop",
            )
        store.writer.flush().result(30)
        counter.reset()
        for i in range(SESSIONS):
            manager.complete(f"const-1@t{i}", {"result": i})
        store.writer.flush().result(30)
        assert _writes(counter) == [("UPDATE", SESSIONS)]
        assert counter.commits == 1
        assert _completed(engine) == SESSIONS

    def test_a_whole_relayed_session_costs_two_statements_at_most(
        self, relay: tuple[Store, ClientConnectionManager, SessionManager], counter: SqlCounter
    ) -> None:
        """One session on its own, start to end with a durable point at each step: its INSERT
        and its UPDATE, nothing per field or per index."""
        store, _, manager = relay
        manager.create(
            "const-1@solo",
            "dev-0",
            origin=Origin.CONSTELLATION,
            mode=Mode.RELAY,
            constellation_id="const-1",
            request="noop",
        )
        store.writer.flush().result(30)
        manager.complete("const-1@solo", "done")
        store.writer.flush().result(30)
        assert _writes(counter) == [("INSERT", 1), ("UPDATE", 1)]
        assert counter.commits == 2

    def test_interleaved_relay_traffic_is_one_statement_per_kind(
        self, relay: tuple[Store, ClientConnectionManager, SessionManager], counter: SqlCounter
    ) -> None:
        """Sessions created and ended one after the other (as relay traffic queues them), before
        one flush: the writer regroups the batch, so one INSERT and one UPDATE for all of them,
        not one pair per session."""
        store, _, manager = relay
        for i in range(SESSIONS):
            manager.create(
                f"const-1@t{i}",
                f"dev-{i % 5}",
                origin=Origin.CONSTELLATION,
                mode=Mode.RELAY,
                constellation_id="const-1",
                request="noop",
            )
            manager.complete(f"const-1@t{i}", {"result": i})
        store.writer.flush().result(30)
        assert _writes(counter) == [("INSERT", SESSIONS), ("UPDATE", SESSIONS)]
        assert counter.commits == 1

    def test_connect_session_disconnect_cycles_are_one_statement_per_kind(
        self,
        relay: tuple[Store, ClientConnectionManager, SessionManager],
        counter: SqlCounter,
        engine: Engine,
    ) -> None:
        """Devices that connect, run one session and leave, all before one flush: each write
        statement runs once for all of them (client upsert, connection insert, connection close,
        client offline, session insert, session update)."""
        store, registry, manager = relay
        for i in range(SESSIONS):
            registry.add_client(f"cycle-{i}", "linux", object(), ClientType.DEVICE)
            manager.create(f"cycle-{i}@t", f"cycle-{i}", origin=Origin.DEVICE, mode=Mode.RELAY)
            manager.complete(f"cycle-{i}@t", None)
            registry.remove_client(f"cycle-{i}")
        store.writer.flush().result(30)
        assert _writes(counter) == [
            ("INSERT", SESSIONS),
            ("INSERT", SESSIONS),
            ("UPDATE", SESSIONS),
            ("UPDATE", SESSIONS),
            ("INSERT", SESSIONS),
            ("UPDATE", SESSIONS),
        ]
        assert counter.commits == 1
        assert _completed(engine) == SESSIONS


def _completed(engine: Engine) -> int:
    """Sessions in state `completed` in the database."""
    with engine.connect() as conn:
        return conn.execute(
            select(func.count())
            .select_from(sessions)
            .where(sessions.c.state == SessionState.COMPLETED.value)
        ).scalar_one()
