"""The write statements, built once per dialect with bound parameters.

Building a SQLAlchemy statement per event costs far more than running it, so every write kind is
a fixed tuple of statements and each event only carries its parameters. All of them are
idempotent: upserts, inserts that ignore an existing key, and updates guarded by state, so a
batch retried after a database outage applies nothing twice.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnClause,
    Executable,
    Table,
    TupleType,
    and_,
    literal_column,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import BindTyping, Dialect
from sqlalchemy.exc import StatementError
from sqlalchemy.sql.compiler import SQLCompiler

from ccm.domain import LIVE_STATES, SessionState
from ccm.store.models import bans, clients, connections, inbox, server_runs, sessions
from ccm.store.writes import (
    BanParams,
    BusMessageParams,
    ConnectParams,
    DisconnectParams,
    LastSeenParams,
    RunStoppedParams,
    SessionCreatedParams,
    SessionEndedParams,
    SessionStartedParams,
    SystemInfoParams,
    WriteKind,
    binds,
)

# Inlined as SQL literals: a list of values would become one "expanding" parameter, which
# executemany() refuses, and every batch with two session ends would fail and go row by row.
_LIVE: list[ColumnClause[Any]] = [
    literal_column(f"'{state.value}'") for state in sorted(LIVE_STATES)
]


def _insert(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect {dialect}")


@cache
def statements_for(dialect: str) -> dict[str, tuple[Executable, ...]]:
    """Write kind -> the statements it runs, in order, for one dialect."""
    c = binds(ConnectParams)
    client_upsert = _insert(dialect, clients).values(
        client_id=c["p_client_id"],
        client_type=c["p_client_type"],
        platform=c["p_platform"],
        metadata=c["p_metadata"],
        system_info=c["p_system_info"],
        first_seen_at=c["p_at"],
        last_seen_at=c["p_at"],
        online=True,
        current_connection_id=c["p_connection_id"],
    )
    client_upsert = client_upsert.on_conflict_do_update(
        index_elements=[clients.c.client_id],
        set_={
            "client_type": client_upsert.excluded.client_type,
            "platform": client_upsert.excluded.platform,
            "metadata": client_upsert.excluded.metadata,
            "system_info": client_upsert.excluded.system_info,
            "last_seen_at": client_upsert.excluded.last_seen_at,
            "online": True,
            "current_connection_id": client_upsert.excluded.current_connection_id,
        },
    )
    connection_insert = (
        _insert(dialect, connections)
        .values(
            connection_id=c["p_connection_id"],
            client_id=c["p_client_id"],
            client_type=c["p_client_type"],
            connected_at=c["p_at"],
            remote_address=c["p_remote_address"],
            server_run_id=c["p_server_run_id"],
        )
        .on_conflict_do_nothing(index_elements=[connections.c.connection_id])
    )
    d = binds(DisconnectParams)
    connection_close = (
        update(connections)
        .where(
            and_(
                connections.c.connection_id == d["p_connection_id"],
                connections.c.disconnected_at.is_(None),
            )
        )
        .values(disconnected_at=d["p_at"], disconnect_reason=d["p_reason"])
    )
    client_offline = (
        update(clients)
        .where(
            and_(
                clients.c.client_id == d["p_client_id"],
                clients.c.current_connection_id == d["p_connection_id"],
            )
        )
        .values(online=False, last_seen_at=d["p_at"], current_connection_id=None)
    )
    i = binds(SystemInfoParams)
    client_system_info = (
        update(clients)
        .where(clients.c.client_id == i["p_client_id"])
        .values(system_info=i["p_system_info"])
    )
    h = binds(LastSeenParams)
    client_last_seen = (
        update(clients)
        .where(
            and_(
                clients.c.client_id == h["p_client_id"],
                clients.c.current_connection_id == h["p_connection_id"],
                clients.c.last_seen_at < h["p_at"],
            )
        )
        .values(last_seen_at=h["p_at"])
    )
    n = binds(SessionCreatedParams)
    session_insert = (
        _insert(dialect, sessions)
        .values(
            id=n["p_id"],
            session_id=n["p_session_id"],
            task_name=n["p_task_name"],
            request=n["p_request"],
            origin=n["p_origin"],
            constellation_id=n["p_constellation_id"],
            device_id=n["p_device_id"],
            mode=n["p_mode"],
            state=n["p_state"],
            created_at=n["p_at"],
            started_at=n["p_started_at"],
            server_run_id=n["p_server_run_id"],
        )
        .on_conflict_do_nothing(index_elements=[sessions.c.id])
    )
    t = binds(SessionStartedParams)
    session_start = (
        update(sessions)
        .where(
            and_(
                sessions.c.id == t["p_id"],
                sessions.c.state == literal_column(f"'{SessionState.PENDING.value}'"),
            )
        )
        .values(state=SessionState.RUNNING.value, started_at=t["p_at"])
    )
    e = binds(SessionEndedParams)
    session_end = (
        update(sessions)
        .where(and_(sessions.c.id == e["p_id"], sessions.c.state.in_(_LIVE)))
        .values(
            state=e["p_state"],
            reason=e["p_reason"],
            result=e["p_result"],
            error=e["p_error"],
            ended_at=e["p_at"],
        )
    )
    x = binds(BanParams)
    ban = bans.insert().values(
        kind=x["p_kind"],
        subject=x["p_subject"],
        connects=x["p_connects"],
        banned_at=x["p_at"],
        until=x["p_until"],
        server_run_id=x["p_server_run_id"],
    )
    m = binds(BusMessageParams)
    bus_message = inbox.insert().values(
        target_run_id=m["p_target_run_id"],
        source_run_id=m["p_source_run_id"],
        kind=m["p_kind"],
        payload=m["p_payload"],
        created_at=m["p_at"],
    )
    r = binds(RunStoppedParams)
    run_stop = (
        update(server_runs)
        .where(server_runs.c.run_id == r["p_run_id"])
        .values(stopped_at=r["p_at"], state="left", ended_reason="stopped")
    )
    return {
        WriteKind.CONNECT: (client_upsert, connection_insert),
        WriteKind.DISCONNECT: (connection_close, client_offline),
        WriteKind.SYSTEM_INFO: (client_system_info,),
        WriteKind.LAST_SEEN: (client_last_seen,),
        WriteKind.SESSION_CREATED: (session_insert,),
        WriteKind.SESSION_STARTED: (session_start,),
        WriteKind.SESSION_ENDED: (session_end,),
        WriteKind.RUN_STOPPED: (run_stop,),
        WriteKind.BUS_MESSAGE: (bus_message,),
        WriteKind.BAN: (ban,),
    }


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """One write statement compiled once for one dialect, run with `conn.exec_driver_sql`.

    `bind(params)` turns a write's parameters into exactly the DBAPI parameters that
    `conn.execute(statement, params)` would send (what `SQLCompiler.construct_params` and the
    column types' bind processors do: literal values filled in, then each value processed by its
    type, e.g. the UTC check and SQLite's datetime text, JSON serialised), without the per-call
    cost of compiled execution (cache lookup, parameter construction, result set-up per row).
    A missing parameter raises KeyError and a refused value what its processor raises; the
    writer reports both as a StatementError, as SQLAlchemy does.
    """

    sql: str
    positional: bool
    names: tuple[str, ...]
    """The DBAPI parameters in order (positional) or by name."""
    defaults: Mapping[str, Any]
    """Values of the statement's literal binds (`online=True`, a guard's state...)."""
    processors: tuple[tuple[Any, Callable[[Any], Any]], ...]
    """(position or name, bind processor) for each parameter whose type processes it."""
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]]

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = self.getter({**self.defaults, **params} if self.defaults else params)
        if self.positional:
            if not self.processors:
                return values
            out = list(values)
            for i, process in self.processors:
                out[i] = process(out[i])
            return tuple(out)
        row = dict(zip(self.names, values, strict=True))
        for name, process in self.processors:
            row[name] = process(row[name])
        return row


def _one_item(name: str) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """Like `operator.itemgetter(name)`, but a 1-tuple, as itemgetter gives for several names."""

    def getter(params: Mapping[str, Any]) -> tuple[Any, ...]:
        return (params[name],)

    return getter


def prepare(statement: Executable, dialect: Dialect) -> Prepared | None:
    """`statement` compiled for `dialect` (an initialised one: compile after it has connected),
    or None if it uses anything `Prepared` does not reproduce: it then runs through
    `conn.execute`."""
    compiled = statement.compile(dialect=dialect, for_executemany=True)  # type: ignore[attr-defined]
    if (
        not isinstance(compiled, SQLCompiler)
        or compiled.positional != dialect.positional
        or dialect.bind_typing is BindTyping.SETINPUTSIZES
        or compiled.literal_execute_params
        or compiled.post_compile_params
        or compiled.escaped_bind_names
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.schema_translate_map
        or (  # "insertmanyvalues" rewrites an executemany INSERT into batches of VALUES
            compiled.isinsert
            and dialect.use_insertmanyvalues
            and (compiled.effective_returning or dialect.use_insertmanyvalues_wo_returning)
        )
    ):
        return None
    bound: dict[str, BindParameter[Any]] = {}
    for bind, name in compiled.bind_names.items():  # the order construct_params() gives
        if bind.callable is not None or isinstance(bind.type, TupleType):
            return None
        bound[name] = bind
    defaults = {name: bind.value for name, bind in bound.items() if not bind.required}
    if compiled.positional:
        assert compiled.positiontup is not None
        names = tuple(compiled.positiontup)
    else:
        names = tuple(bound)
    processors = []
    for i, name in enumerate(names):
        bind = bound[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((i if compiled.positional else name, process))
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    getter = _one_item(names[0]) if len(names) == 1 else operator.itemgetter(*names)
    return Prepared(
        sql=compiled.string,
        positional=bool(compiled.positional),
        names=names,
        defaults=defaults,
        processors=tuple(processors),
        getter=getter,
    )


_prepared: weakref.WeakKeyDictionary[Dialect, dict[str, tuple[Prepared | None, ...]]] = (
    weakref.WeakKeyDictionary()
)


def prepared_for(dialect: Dialect) -> dict[str, tuple[Prepared | None, ...]]:
    """`statements_for(dialect.name)`, each prepared for this dialect (None: run it as is).
    Call with a connected engine's dialect: compilation depends on what the server supports."""
    try:
        return _prepared[dialect]
    except KeyError:
        pass
    built = {
        kind: tuple(prepare(statement, dialect) for statement in statements)
        for kind, statements in statements_for(dialect.name).items()
    }
    _prepared[dialect] = built
    return built


def bind_rows(prepared: Prepared, params: list[Mapping[str, Any]]) -> list[Any]:
    """DBAPI parameters for each row; a value that cannot be bound raises a StatementError, as it
    does when SQLAlchemy binds it."""
    try:
        return [prepared.bind(p) for p in params]
    except Exception as exc:
        raise StatementError(str(exc), prepared.sql, None, exc) from exc
