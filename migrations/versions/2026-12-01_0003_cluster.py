"""cluster: server runs are nodes with leases; one open connection per client id; the inbox

- server_runs gains what a node of a cluster needs: name, address, pid, state (alive / left /
  dead), the lease (renewed_at, lease_until, with the database's clock) and why it ended.
  Existing runs: a stopped run is `left`; a run that never recorded its stop is `alive` with no
  lease, so the next node to start reaps it (what restart recovery did before).
- A partial unique index allows at most one open connection per client id. Open duplicates
  left by earlier versions (only a crash between two writes could make them) are closed first,
  keeping the newest, as restart recovery would have.
- Partial index on the open connections of each run, and (server_run_id, state) on sessions:
  what reaping a dead node reads.
- inbox: messages between nodes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ccm.store.models import JSONValue, UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = "disconnected_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("server_runs") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("address", sa.String(255), nullable=True))
        batch.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="left"))
        batch.add_column(sa.Column("renewed_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("lease_until", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("ended_reason", sa.String(64), nullable=True))
    op.execute("UPDATE server_runs SET state = 'alive' WHERE stopped_at IS NULL")
    op.create_index("ix_server_runs_state_lease_until", "server_runs", ["state", "lease_until"])

    # Close open duplicates (all but the newest open connection of a client id).
    op.execute(
        "UPDATE connections SET disconnected_at = connected_at, "
        "disconnect_reason = 'server_restart' "
        "WHERE disconnected_at IS NULL AND EXISTS ("
        " SELECT 1 FROM connections newer"
        " WHERE newer.client_id = connections.client_id AND newer.disconnected_at IS NULL"
        " AND (newer.connected_at > connections.connected_at"
        "  OR (newer.connected_at = connections.connected_at"
        "   AND newer.connection_id > connections.connection_id)))"
    )
    op.create_index(
        "ux_connections_open_client_id",
        "connections",
        ["client_id"],
        unique=True,
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )
    op.create_index(
        "ix_connections_open_server_run_id",
        "connections",
        ["server_run_id"],
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )
    op.create_index("ix_sessions_server_run_id_state", "sessions", ["server_run_id", "state"])
    op.create_table(
        "inbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("target_run_id", sa.String(36), nullable=False),
        sa.Column("source_run_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", JSONValue, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox")),
    )
    op.create_index("ix_inbox_target_run_id_id", "inbox", ["target_run_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_inbox_target_run_id_id", table_name="inbox")
    op.drop_table("inbox")
    op.drop_index("ix_sessions_server_run_id_state", table_name="sessions")
    op.drop_index("ix_connections_open_server_run_id", table_name="connections")
    op.drop_index("ux_connections_open_client_id", table_name="connections")
    op.drop_index("ix_server_runs_state_lease_until", table_name="server_runs")
    with op.batch_alter_table("server_runs") as batch:
        for column in ("ended_reason", "lease_until", "renewed_at", "state", "pid", "address"):
            batch.drop_column(column)
        batch.drop_column("name")
