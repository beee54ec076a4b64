"""The writer's fast path, on both databases: a batch regrouped by kind must leave exactly what
its writes applied one by one in queued order leave, and a statement run through
`exec_driver_sql` with `Prepared`'s bind processing must send, store and read back exactly what
`conn.execute` of the SQLAlchemy statement does.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, bindparam, create_engine, event, select, text, update

from ccm.domain import SessionState
from ccm.store import Store, StoreWriter
from ccm.store.models import clients, connections, server_runs, sessions
from ccm.store.ordering import batch_order as _reorder
from ccm.store.repository import read_connection_history, read_online_clients, read_sessions
from ccm.store.statements import prepare, prepared_for, statements_for
from ccm.store.writes import CustomWrite, Write

FLUSH_TIMEOUT = 60
T0 = datetime(2026, 3, 1, 9, 30, 0, 123456, tzinfo=UTC)
ZONES = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-7, minutes=-30))]
TABLES = (server_runs, clients, connections, sessions)


class Capture:
    """Stands in for a StoreWriter: keeps what a Store submits."""

    def __init__(self) -> None:
        self.writes: list[Write] = []

    def submit(self, write: Write) -> None:
        self.writes.append(write)


def _at(i: int) -> datetime:
    return (T0 + timedelta(seconds=i)).astimezone(ZONES[i % len(ZONES)])


def _snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        return {
            table.name: [
                dict(row)
                for row in conn.execute(
                    select(table).order_by(*table.primary_key.columns)
                ).mappings()
            ]
            for table in TABLES
        }


def _clear(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("connections", "sessions", "clients", "server_runs"):
            conn.execute(text(f"DELETE FROM {table}"))


def _apply(engine: Engine, writes: list[Write], *, batch_size: int) -> None:
    """Apply `writes` through a writer that is not started: flush() runs them inline, in
    transactions of `batch_size` writes."""
    writer = StoreWriter(engine, batch_size=batch_size)
    for write in writes:
        writer.submit(write)
    writer.flush().result(FLUSH_TIMEOUT)
    assert writer.stats().writes_failed == 0


def _mark_error(session_id: str) -> Write:
    def apply(conn: Connection) -> None:
        conn.execute(update(sessions).where(sessions.c.id == session_id).values(error="marked"))

    return CustomWrite("custom", apply)


def _random_writes(seed: int, n: int) -> list[Write]:
    """A mixed batch over few keys, so rows see many writes: reconnects and takeovers (at most
    one open connection per client, as the schema allows), clients heard from, sessions created
    and ended (also in the wrong order, and twice), custom writes."""
    rnd = random.Random(seed)
    capture = Capture()
    store = Store(None, capture, run_id="run-1")  # type: ignore[arg-type]
    client_ids = [f"c{i}" for i in range(3)]
    session_ids = [f"s{i}" for i in range(6)]
    connection_ids: list[tuple[str, str]] = []
    open_connection: dict[str, str] = {}
    for i in range(n):
        at = _at(i)
        roll = rnd.random()
        client = rnd.choice(client_ids)
        sid = rnd.choice(session_ids)
        if roll < 0.2:
            connection_id = f"k{i}"
            connection_ids.append((connection_id, client))
            if client in open_connection:  # a takeover: the old connection closes first
                store.record_disconnect(
                    connection_id=open_connection[client],
                    client_id=client,
                    reason="replaced",
                    at=at,
                )
            open_connection[client] = connection_id
            store.record_connect(
                connection_id=connection_id,
                client_id=client,
                client_type="device",
                platform=rnd.choice(["linux", None]),
                metadata={"n": i, "tag": "é"},
                system_info=rnd.choice([None, {"i": i}]),
                remote_address=f"10.0.0.{i}",
                at=at,
            )
        elif roll < 0.35 and connection_ids:
            connection_id, owner = rnd.choice(connection_ids)
            if open_connection.get(owner) == connection_id:
                del open_connection[owner]
            store.record_disconnect(
                connection_id=connection_id,
                client_id=owner if rnd.random() < 0.9 else client,
                reason=rnd.choice(["closed", "replaced"]),
                at=at,
            )
        elif roll < 0.4:
            store.record_system_info(client_id=client, system_info={"at": i})
        elif roll < 0.6:
            store.record_session_created(
                id=sid,
                session_id=f"wire-{sid}",
                task_name=rnd.choice(["t", None]),
                request="r",
                origin="constellation",
                constellation_id=rnd.choice(["c0", None]),
                device_id=client,
                mode="relay",
                state=rnd.choice([SessionState.PENDING, SessionState.RUNNING]),
                at=at,
            )
        elif roll < 0.7 and connection_ids:
            connection_id, owner = rnd.choice(connection_ids)
            store.record_last_seen(client_id=owner, connection_id=connection_id, at=at)
        elif roll < 0.92:
            store.record_session_ended(
                id=sid,
                state=rnd.choice([SessionState.COMPLETED, SessionState.FAILED]),
                reason=rnd.choice([None, "device_disconnected"]),
                result=rnd.choice([None, {"ok": i}, [1, "x"], "text"]),
                error=rnd.choice([None, "boom"]),
                at=at,
            )
        elif roll < 0.96:
            capture.writes.append(_mark_error(sid))
        else:
            store.record_run_stopped(at=at)
    return capture.writes


class TestRegroupedBatchEqualsQueuedOrder:
    @pytest.mark.parametrize("seed", range(8))
    def test_random_mixed_batch(self, engine: Engine, seed: int) -> None:
        """The final state of every table after one regrouped batch equals that of applying the
        same writes one per transaction, in queued order."""
        writes = _random_writes(seed, 150)
        assert _reorder(writes) != writes  # the batch really was regrouped
        with engine.begin() as conn:
            conn.execute(server_runs.insert().values(run_id="run-1", started_at=T0))
        _apply(engine, writes, batch_size=1)
        sequential = _snapshot(engine)
        _clear(engine)
        with engine.begin() as conn:
            conn.execute(server_runs.insert().values(run_id="run-1", started_at=T0))
        _apply(engine, writes, batch_size=10_000)
        assert _snapshot(engine) == sequential
        assert sequential["sessions"]
        assert sequential["connections"]


def _created(i: int, *, key: str | None = None) -> Write:
    key = key or f"s{i}"
    return Write("session_created", key=key, params={"p_id": key, "p_at": _at(i)})


def _ended(i: int, *, key: str | None = None) -> Write:
    key = key or f"s{i}"
    return Write("session_ended", key=key, params={"p_id": key, "p_at": _at(i)})


def _connect(client: str, connection: str) -> Write:
    return Write(
        "connect", key=client, params={"p_client_id": client, "p_connection_id": connection}
    )


def _disconnect(client: str, connection: str) -> Write:
    return Write(
        "disconnect", key=connection, params={"p_client_id": client, "p_connection_id": connection}
    )


class TestReorder:
    def test_relay_traffic_is_grouped_by_kind(self) -> None:
        """Interleaved creates and ends of different sessions: all creates, then all ends."""
        writes = [w for i in range(5) for w in (_created(i), _ended(i))]
        assert _reorder(writes) == [_created(i) for i in range(5)] + [_ended(i) for i in range(5)]

    def test_a_row_keeps_the_order_of_its_writes(self) -> None:
        """An end queued before the create of the same session is not moved after it."""
        writes = [_created(0), _ended(1), _ended(0), _created(1), _created(2)]
        reordered = _reorder(writes)
        assert reordered.index(_ended(1)) < reordered.index(_created(1))
        assert reordered.index(_created(0)) < reordered.index(_ended(0))
        assert sorted(map(id, reordered)) == sorted(map(id, writes))

    def test_a_reconnect_is_not_reordered(self) -> None:
        """connect, disconnect, connect of one client (a takeover) keep their order."""
        writes = [_connect("c", "k1"), _disconnect("c", "k1"), _connect("c", "k2")]
        assert _reorder(writes) == writes

    def test_connects_of_different_clients_are_grouped(self) -> None:
        """Connects of different clients are moved together, and so are their disconnects."""
        writes = [
            _connect("a", "k1"),
            _disconnect("a", "k1"),
            _connect("b", "k2"),
            _disconnect("b", "k2"),
        ]
        assert _reorder(writes) == [writes[0], writes[2], writes[1], writes[3]]

    def test_custom_writes_and_other_kinds_are_barriers(self) -> None:
        """No write is moved across a custom write or a write kind that is not grouped."""
        custom = _mark_error("s0")
        info = Write("system_info", key="c", params={"p_client_id": "c"})
        writes = [_created(0), _ended(0), custom, _created(1), info, _ended(1)]
        assert _reorder(writes) == writes

    def test_a_write_without_plain_string_keys_is_a_barrier(self) -> None:
        """A write whose parameters are not plain strings is a barrier: nothing moves across it."""
        odd = Write("session_ended", key="x", params={"p_id": None})
        assert _reorder([_ended(1), _created(0)]) == [_created(0), _ended(1)]
        assert _reorder([_ended(1), odd, _created(0)]) == [_ended(1), odd, _created(0)]


def _samples() -> dict[str, dict[str, Any]]:
    at = datetime(2026, 5, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    return {
        "connect": {
            "p_connection_id": "k-1",
            "p_client_id": "c-1",
            "p_client_type": "device",
            "p_platform": "linux",
            "p_metadata": {"a": [1, 2.5, None, "ü"], "b": True},
            "p_system_info": None,
            "p_remote_address": "::1",
            "p_server_run_id": None,
            "p_at": at,
        },
        "disconnect": {
            "p_connection_id": "k-1",
            "p_client_id": "c-1",
            "p_reason": "closed",
            "p_at": at + timedelta(seconds=1),
        },
        "system_info": {"p_client_id": "c-1", "p_system_info": {"cpu": 4, "tags": ["x"]}},
        "session_created": {
            "p_id": "s-1",
            "p_session_id": "wire",
            "p_task_name": None,
            "p_request": "r\n",
            "p_origin": "device",
            "p_constellation_id": None,
            "p_device_id": "c-1",
            "p_mode": "relay",
            "p_state": "pending",
            "p_at": at,
            "p_started_at": None,
            "p_server_run_id": "run",
        },
        "last_seen": {
            "p_client_id": "c-1",
            "p_connection_id": "k-1",
            "p_at": at.astimezone(UTC) + timedelta(seconds=1),
        },
        "session_started": {"p_id": "s-1", "p_at": at + timedelta(seconds=1)},
        "session_ended": {
            "p_id": "s-1",
            "p_state": "completed",
            "p_reason": None,
            "p_result": [{"x": 1}, "y"],
            "p_error": None,
            "p_at": at,
        },
        "run_stopped": {"p_run_id": "run", "p_at": at},
        "ban": {
            "p_kind": "client_id",
            "p_subject": "c-1",
            "p_connects": 16,
            "p_at": at,
            "p_until": at + timedelta(minutes=5),
            "p_server_run_id": "run",
        },
        "bus_message": {
            "p_target_run_id": "run-2",
            "p_source_run_id": "run",
            "p_kind": "deliver",
            "p_payload": {"client_id": "c-1", "frame": "{}"},
            "p_at": at,
        },
    }


def _comparable(value: Any) -> Any:
    """psycopg's Json/Jsonb wrappers have no equality: compare what they wrap."""
    if hasattr(value, "obj") and hasattr(value, "dumps"):
        return (type(value).__name__, value.obj)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_comparable(v) for v in value)
    return value


class TestPreparedStatements:
    def test_every_write_statement_is_prepared(self, engine: Engine) -> None:
        """No statement falls back to compiled execution (the fast path is really used)."""
        with engine.connect() as conn:
            prepared = prepared_for(conn.dialect)
        assert set(prepared) == set(statements_for(engine.dialect.name))
        assert all(p is not None for kind in prepared.values() for p in kind)

    def test_sql_and_dbapi_parameters_equal_what_sqlalchemy_sends(self, engine: Engine) -> None:
        """For every statement, the SQL and the DBAPI parameters (after literal values and type
        processing: UTC datetimes, JSON, booleans) are those conn.execute() would send."""
        sent: list[tuple[str, Any]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            sent.append((statement, parameters))

        samples = _samples()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            with engine.connect() as conn:
                prepared = prepared_for(conn.dialect)
                with conn.begin() as tx:  # in order, as a history would be; rolled back
                    for kind, statements in statements_for(conn.dialect.name).items():
                        for statement, fast in zip(statements, prepared[kind], strict=True):
                            assert fast is not None
                            sent.clear()
                            conn.execute(statement, samples[kind])
                            [(sql, parameters)] = sent
                            # A single-row INSERT asks for its new id on PostgreSQL; the writer,
                            # which never needs it, runs the executemany form without RETURNING.
                            sql = sql.removesuffix(" RETURNING inbox.id")
                            sql = sql.removesuffix(" RETURNING bans.id")
                            assert fast.sql == sql
                            bound = fast.bind(samples[kind])
                            assert _comparable(bound) == _comparable(parameters)
                    tx.rollback()
        finally:
            event.remove(engine, "before_cursor_execute", capture)

    def test_rows_read_back_equal_those_written_by_compiled_execution(self, engine: Engine) -> None:
        """The same history written by the writer and by plain conn.execute() of each statement
        reads back identically through the repository's read functions and in every column."""
        samples = _samples()

        def keyed(kind: str, suffix: str) -> dict[str, Any]:
            params = dict(samples[kind])
            for name in ("p_id", "p_connection_id", "p_client_id", "p_run_id"):
                if name in params:
                    params[name] += suffix
            return params

        kinds = [
            "connect",
            "system_info",
            "last_seen",
            "session_created",
            "session_started",
            "session_ended",
            "disconnect",
            "connect",
            "run_stopped",
        ]
        with engine.begin() as conn:
            for suffix in ("-plain", "-fast"):
                conn.execute(server_runs.insert().values(run_id="run" + suffix, started_at=T0))
            for kind in kinds:
                for statement in statements_for(conn.dialect.name)[kind]:
                    conn.execute(statement, keyed(kind, "-plain"))
        writer = StoreWriter(engine)
        for kind in kinds:
            writer.submit(Write(kind, params=keyed(kind, "-fast")))
        writer.flush().result(FLUSH_TIMEOUT)
        assert writer.stats().writes_failed == 0

        def unkeyed(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: unkeyed(v) for k, v in value.items()}
            if isinstance(value, str):
                return value.replace("-plain", "").replace("-fast", "")
            return value

        plain, fast = [], []
        for table in TABLES:
            with engine.connect() as conn:
                for row in conn.execute(select(table)).mappings():
                    key = str(row[table.primary_key.columns[0].name])
                    (plain if key.endswith("-plain") else fast).append(unkeyed(dict(row)))
        assert plain == fast
        assert len(plain) == len(TABLES)

        def both(rows: list[Any]) -> list[dict[str, Any]]:
            assert len(rows) == 2
            return [unkeyed(row.as_dict()) for row in rows]

        plain_session, fast_session = both(read_sessions(engine, session_id="wire"))
        assert plain_session == fast_session
        assert plain_session["state"] == "completed"
        assert plain_session["result"] == [{"x": 1}, "y"]
        plain_history, fast_history = both(
            [
                r
                for suffix in ("-plain", "-fast")
                for r in read_connection_history(engine, "c-1" + suffix)
            ]
        )
        assert plain_history == fast_history
        plain_client, fast_client = both(read_online_clients(engine))
        assert plain_client == fast_client
        ended = read_sessions(engine, session_id="wire")[0]
        assert ended.ended_at == samples["session_ended"]["p_at"]
        assert ended.ended_at is not None
        assert ended.ended_at.tzinfo is UTC


class TestBadWritesOnTheFastPath:
    def test_missing_parameter_drops_only_that_write(self, engine: Engine) -> None:
        """A write lacking a parameter fails binding (a StatementError, as in SQLAlchemy) and is
        dropped alone; the rest of its group is committed."""
        writer = StoreWriter(engine)
        sample = _samples()["session_created"]
        for i in range(5):
            params = dict(sample, p_id=f"s-{i}")
            if i == 2:
                del params["p_mode"]
            writer.submit(Write("session_created", key=f"s-{i}", params=params))
        writer.flush().result(FLUSH_TIMEOUT)
        assert writer.stats().writes_failed == 1
        with engine.connect() as conn:
            stored = set(conn.execute(select(sessions.c.id)).scalars())
        assert stored == {"s-0", "s-1", "s-3", "s-4"}


class TestPrepare:
    def test_a_single_parameter_statement(self) -> None:
        """A one-parameter UPDATE is prepared; bind() renders a datetime as SQLite text in UTC."""
        engine = create_engine("sqlite://")
        with engine.connect() as conn:
            prepared = prepare(
                update(server_runs).values(stopped_at=bindparam("p_at")), conn.dialect
            )
        assert prepared is not None
        assert prepared.names == ("p_at",)
        at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
        assert prepared.bind({"p_at": at}) == ("2026-01-02 02:04:05.000000",)
        with pytest.raises(ValueError, match="naive datetime"):
            prepared.bind({"p_at": datetime(2026, 1, 2)})
        engine.dispose()

    def test_what_it_cannot_reproduce_is_left_to_compiled_execution(self) -> None:
        """An expanding IN list is rendered per execution: not prepared (None)."""
        engine = create_engine("sqlite://")
        with engine.connect() as conn:
            statement = (
                update(sessions)
                .where(sessions.c.id.in_(bindparam("p_ids", expanding=True)))
                .values(error="x")
            )
            assert prepare(statement, conn.dialect) is None
        engine.dispose()
