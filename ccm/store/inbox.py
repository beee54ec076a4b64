"""The inbox: messages between nodes (PostgreSQL). A message is a row written in its sender's
transaction, so it exists only if that commits; NOTIFY wakes the target's reader, which reads
and deletes its rows in id order (reading is the pruning). After its listening connection
reconnects, a reader LISTENs first, then reads whatever is still there (catch-up).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from ccm.store.models import inbox

TAKE_LIMIT = 500


def take_messages(
    engine: Engine, run_id: str, limit: int = TAKE_LIMIT
) -> list[tuple[int, str, str, Any]]:
    """Read and delete the oldest messages of `run_id`'s inbox (reading is the pruning): (id,
    source, kind, payload) in id order. Each source commits its messages in order, so id order
    is send order per source."""
    oldest = (
        select(inbox.c.id)
        .where(inbox.c.target_run_id == run_id)
        .order_by(inbox.c.id)
        .limit(limit)
        .scalar_subquery()
    )
    with engine.begin() as conn:
        rows = conn.execute(
            delete(inbox)
            .where(inbox.c.target_run_id == run_id, inbox.c.id.in_(oldest))
            .returning(inbox.c.id, inbox.c.source_run_id, inbox.c.kind, inbox.c.payload)
        ).all()
    return sorted((row[0], row[1], row[2], row[3]) for row in rows)


def send_messages(
    conn: Connection, *, source: str, targets: list[str], kind: str, payload: Any, at: datetime
) -> None:
    """Messages written in the caller's transaction (the reaper's), with their wake-ups."""
    if not targets:
        return
    conn.execute(
        inbox.insert(),
        [
            {
                "target_run_id": target,
                "source_run_id": source,
                "kind": kind,
                "payload": payload,
                "created_at": at,
            }
            for target in targets
        ],
    )
    for target in targets:
        notify(conn, inbox_channel(target))


def inbox_channel(run_id: str) -> str:
    """The NOTIFY channel that wakes `run_id`'s reader."""
    return f"ccm_inbox_{run_id}"


DIRECTORY_CHANNEL = "ccm_directory"
"""NOTIFY channel whose payload names a run whose connections changed."""


def notify(conn: Connection, channel: str, payload: str = "") -> None:
    conn.execute(select(func.pg_notify(channel, payload)))
