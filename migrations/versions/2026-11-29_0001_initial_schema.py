"""initial schema: server_runs, clients, connections, sessions

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types at this revision: migrations never import the live models.
JSONValue = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def UTC() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "server_runs",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("started_at", UTC(), nullable=False),
        sa.Column("stopped_at", UTC(), nullable=True),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_server_runs")),
    )
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(length=512), nullable=False),
        sa.Column("client_type", sa.String(length=16), nullable=False),
        sa.Column("platform", sa.String(length=64), nullable=True),
        sa.Column("metadata", JSONValue, nullable=True),
        sa.Column("system_info", JSONValue, nullable=True),
        sa.Column("first_seen_at", UTC(), nullable=False),
        sa.Column("last_seen_at", UTC(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("current_connection_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_clients")),
    )
    op.create_index("ix_clients_online_client_type", "clients", ["online", "client_type"])
    op.create_table(
        "connections",
        sa.Column("connection_id", sa.String(length=36), nullable=False),
        sa.Column("client_id", sa.String(length=512), nullable=False),
        sa.Column("client_type", sa.String(length=16), nullable=False),
        sa.Column("connected_at", UTC(), nullable=False),
        sa.Column("disconnected_at", UTC(), nullable=True),
        sa.Column("disconnect_reason", sa.String(length=64), nullable=True),
        sa.Column("remote_address", sa.String(length=128), nullable=True),
        sa.Column("server_run_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.client_id"], name=op.f("fk_connections_client_id_clients")
        ),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_connections")),
    )
    op.create_index(
        "ix_connections_client_id_connected_at", "connections", ["client_id", "connected_at"]
    )
    op.create_index("ix_connections_disconnected_at", "connections", ["disconnected_at"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=512), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=True),
        sa.Column("request", sa.Text(), nullable=True),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("constellation_id", sa.String(length=512), nullable=True),
        sa.Column("device_id", sa.String(length=512), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("result", JSONValue, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC(), nullable=False),
        sa.Column("started_at", UTC(), nullable=True),
        sa.Column("ended_at", UTC(), nullable=True),
        sa.Column("server_run_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sessions")),
    )
    op.create_index("ix_sessions_session_id", "sessions", ["session_id"])
    op.create_index("ix_sessions_device_id_created_at", "sessions", ["device_id", "created_at"])
    op.create_index(
        "ix_sessions_constellation_id_created_at", "sessions", ["constellation_id", "created_at"]
    )
    op.create_index("ix_sessions_state_ended_at", "sessions", ["state", "ended_at"])
    op.create_index("ix_sessions_task_name_created_at", "sessions", ["task_name", "created_at"])


def downgrade() -> None:
    op.drop_table("sessions")
    op.drop_table("connections")
    op.drop_table("clients")
    op.drop_table("server_runs")
