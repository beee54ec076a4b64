"""Claims of client ids across the cluster (PostgreSQL): at most one open connection per id,
decided by the database's partial unique index, with the fencing check a node's writes carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, and_, func, select, update
from sqlalchemy.dialects import postgresql

from ccm.domain import DisconnectReason
from ccm.store.models import clients, connections, server_runs
from ccm.store.nodes import ALIVE
from ccm.store.statements import statements_for
from ccm.store.writes import ConnectParams, WriteKind


def holder_of(engine: Engine, client_id: str) -> tuple[str, str, bool] | None:
    """(connection id, run id, whether that run's lease is running) of the open connection of
    `client_id`, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                connections.c.connection_id,
                connections.c.server_run_id,
                and_(server_runs.c.state == ALIVE, server_runs.c.lease_until > func.now()),
            )
            .select_from(
                connections.outerjoin(
                    server_runs, server_runs.c.run_id == connections.c.server_run_id
                )
            )
            .where(connections.c.client_id == client_id, connections.c.disconnected_at.is_(None))
        ).first()
    if row is None:
        return None
    return row[0], row[1] or "", bool(row[2])


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of claiming a client id for a new connection."""

    claimed: bool
    holder: tuple[str, str] | None = None
    """(connection id, run id) of the open connection that kept the id, if not claimed."""
    replaced: tuple[tuple[str, str], ...] = ()
    """(connection id, run id) of open connections closed as `replaced` (takeover)."""


def claim(conn: Connection, params: ConnectParams, *, takeover: bool) -> Claim:
    """In the caller's transaction: open the connection row of `params` unless the client id
    has an open connection already; with `takeover`, close that one as `replaced` first. The
    client row is upserted only if the claim succeeds. Two nodes racing on one id: the second
    INSERT waits for the first transaction and then does nothing."""
    replaced: tuple[tuple[str, str], ...] = ()
    client_id = params["p_client_id"]
    if takeover:
        rows = conn.execute(
            update(connections)
            .where(connections.c.client_id == client_id, connections.c.disconnected_at.is_(None))
            .values(
                disconnected_at=params["p_at"], disconnect_reason=DisconnectReason.REPLACED.value
            )
            .returning(connections.c.connection_id, connections.c.server_run_id)
        ).all()
        replaced = tuple((row[0], row[1] or "") for row in rows)
    # The connection's foreign key needs the client row: make sure one exists, changing nothing
    # in an existing one (the loser of a race must not overwrite the winner's).
    conn.execute(
        postgresql.insert(clients)
        .values(
            client_id=client_id,
            client_type=params["p_client_type"],
            first_seen_at=params["p_at"],
            last_seen_at=params["p_at"],
            online=False,
        )
        .on_conflict_do_nothing(index_elements=[clients.c.client_id])
    )
    inserted = conn.execute(
        postgresql.insert(connections)
        .values(
            connection_id=params["p_connection_id"],
            client_id=client_id,
            client_type=params["p_client_type"],
            connected_at=params["p_at"],
            remote_address=params["p_remote_address"],
            server_run_id=params["p_server_run_id"],
        )
        .on_conflict_do_nothing(
            index_elements=[connections.c.client_id],
            index_where=connections.c.disconnected_at.is_(None),
        )
        .returning(connections.c.connection_id)
    ).first()
    if inserted is None:
        holder = conn.execute(
            select(connections.c.connection_id, connections.c.server_run_id).where(
                connections.c.client_id == client_id, connections.c.disconnected_at.is_(None)
            )
        ).first()
        return Claim(False, holder=(holder[0], holder[1] or "") if holder else None)
    statement = statements_for("postgresql")[WriteKind.CONNECT][0]  # the client upsert
    conn.execute(statement, dict(params))
    return Claim(True, replaced=replaced)


def close_connection(
    conn: Connection, connection_id: str, reason: DisconnectReason, at: datetime
) -> bool:
    """Close one open connection row (a dead holder's, or a stale one), in the caller's
    transaction. False if it was closed already."""
    closed = conn.execute(
        update(connections)
        .where(
            connections.c.connection_id == connection_id, connections.c.disconnected_at.is_(None)
        )
        .values(disconnected_at=at, disconnect_reason=reason.value)
        .returning(connections.c.client_id)
    ).first()
    if closed is None:
        return False
    conn.execute(
        update(clients)
        .where(clients.c.current_connection_id == connection_id)
        .values(online=False, current_connection_id=None)
    )
    return True


def is_alive(conn: Connection, run_id: str) -> bool:
    """In the caller's transaction: whether `run_id` is still an alive node, holding a share
    lock on its row until the transaction ends, so a reaper's UPDATE waits for it (and this
    transaction's writes land before the reap, or not at all)."""
    row = conn.execute(
        select(server_runs.c.run_id)
        .where(server_runs.c.run_id == run_id, server_runs.c.state == ALIVE)
        .with_for_update(read=True)
    ).first()
    return row is not None
